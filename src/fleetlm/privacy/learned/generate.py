"""Labelled training rows for the learned PII recognizer, generated from templates.

Presidio's synthetic set is small and template-bound: its names are mostly Western, its
addresses put digit groups next to street names, and its texts are few in style. A model
trained on it alone calls non-English names, bank names and the digit groups of IBANs or
licence numbers LOCATION. :func:`generate` makes more rows, in exactly the synthetic
set's format (``full_text`` plus character ``spans``), in the styles of support tickets,
e-mails with signature blocks, sloppy chat messages and bank / insurance / telco /
health / HR requests. It draws

* names and places from many Faker locales (Latin-script forms, diacritics kept, plus
  romanised Japanese and Chinese names and a hand-written list of transliterated Arabic
  names): full names, given names alone, surnames alone, "Mr./Dr. X" (the title is its
  own TITLE span, as in the synthetic set), hyphenated and particle surnames;
* structured values with their own labels (IBAN with and without spaces, card numbers,
  national and international phone numbers, e-mails, SSNs, driver-licence, passport and
  account numbers, IPs, URLs, postcodes, ages, dates, times), so the model sees digit
  groups that are *not* places;
* organisations (banks, telcos, insurers, hospitals, universities, companies with legal
  suffixes), nationalities and religions (NRP), street lines (STREET_ADDRESS: the street
  line only; the postcode is a ZIP_CODE span, city and country separate GPE spans, as in
  the synthetic set's split addresses);
* negatives (about a fifth of the rows): texts with no PII, or with capitalised words that
  are not PII (products, "Apple Pay", "Visa", "IBAN" or "SSN" as words). Weekdays, months,
  years and dates are DATE_TIME wherever they occur, as in the synthetic set.

Texts are built piece by piece and each span's offsets recorded as it is appended, so
``full_text[start:end] == entity_value`` always. The same ``(n, seed)`` gives the same
rows. The templates were written independently of any evaluation set; this module never
reads the hand-labelled evaluation sets (nor any file: Faker is its only input).
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections.abc import Callable
from typing import Any

Piece = str | tuple[str, str]  # literal text, or (entity type, value)

# Name locales (Latin-script first/last names in Faker) and their weights. ja_JP, zh_CN
# and zh_TW are used through their romanised-name methods; "ar" is the hand list below.
NAME_LOCALES: dict[str, float] = {
    "en_US": 3, "en_GB": 2, "en_IE": 1, "en_IN": 2, "en_NG": 1, "yo_NG": 2, "ig_NG": 1,
    "ha_NG": 1, "en_PK": 1, "en_KE": 1, "zu_ZA": 1, "tw_GH": 1, "sw": 1, "de_DE": 2,
    "de_AT": 1, "de_CH": 1, "fr_FR": 2, "fr_DZ": 1, "es_ES": 2, "es_MX": 2, "it_IT": 2,
    "pl_PL": 3, "pt_BR": 2, "pt_PT": 1, "nl_NL": 2, "nl_BE": 1, "sv_SE": 1, "da_DK": 1,
    "no_NO": 1, "fi_FI": 1, "tr_TR": 2, "vi_VN": 2, "cs_CZ": 1, "sk_SK": 1, "hu_HU": 1,
    "ro_RO": 1, "hr_HR": 1, "sl_SI": 1, "lt_LT": 1, "lv_LV": 1, "et_EE": 1, "ga_IE": 1,
    "az_AZ": 1, "id_ID": 1, "ja_JP": 1, "zh_CN": 1, "zh_TW": 1, "ar": 2,
}
# Locales whose Faker address provider gives real-looking Latin-script streets and cities.
PLACE_LOCALES: tuple[str, ...] = (
    "en_US", "en_GB", "en_IE", "en_IN", "de_DE", "de_AT", "de_CH", "fr_FR", "fr_DZ",
    "es_ES", "it_IT", "pl_PL", "pt_PT", "nl_NL", "nl_BE", "sv_SE", "da_DK", "no_NO",
    "fi_FI", "cs_CZ", "sk_SK", "hu_HU", "ro_RO", "hr_HR", "sl_SI", "vi_VN", "id_ID",
)
# Name locales whose own (Latin) street provider is used half the time, with real cities.
PLACE_EXTRA: tuple[str, ...] = ("en_NG", "yo_NG", "ig_NG", "ha_NG", "en_PK", "en_KE", "tr_TR",
                                "es_MX", "pt_BR")
IBAN_LOCALES: tuple[str, ...] = (
    "en_GB", "de_DE", "de_AT", "de_CH", "fr_FR", "es_ES", "it_IT", "pl_PL", "pt_PT",
    "nl_NL", "nl_BE", "da_DK", "no_NO", "fi_FI", "cs_CZ", "sk_SK", "ro_RO", "en_IE", "tr_TR",
)
# Where a name locale has no usable address provider: real cities and a country.
CITIES: dict[str, tuple[tuple[str, ...], str]] = {
    "nigeria": (("Lagos", "Ibadan", "Abuja", "Kano", "Port Harcourt", "Enugu", "Abeokuta",
                 "Ogbomosho", "Ilorin", "Oshogbo"), "Nigeria"),
    "arab": (("Cairo", "Amman", "Riyadh", "Dubai", "Casablanca", "Algiers", "Tunis",
              "Beirut", "Doha", "Marrakesh", "Alexandria", "Muscat"), "Morocco"),
    "japan": (("Tokyo", "Osaka", "Kyoto", "Sapporo", "Fukuoka", "Nagoya", "Sendai"), "Japan"),
    "china": (("Beijing", "Shanghai", "Shenzhen", "Chengdu", "Hangzhou", "Wuhan",
               "Guangzhou"), "China"),
    "taiwan": (("Taipei", "Kaohsiung", "Taichung", "Tainan", "Hsinchu"), "Taiwan"),
    "pakistan": (("Lahore", "Karachi", "Islamabad", "Faisalabad", "Peshawar"), "Pakistan"),
    "kenya": (("Nairobi", "Mombasa", "Kisumu", "Nakuru", "Eldoret"), "Kenya"),
    "ghana": (("Accra", "Kumasi", "Tamale", "Cape Coast"), "Ghana"),
    "southafrica": (("Johannesburg", "Durban", "Cape Town", "Pretoria", "Soweto"),
                    "South Africa"),
    "turkey": (("İstanbul", "Ankara", "İzmir", "Bursa", "Antalya", "Eskişehir"), "Türkiye"),
    "baltic": (("Vilnius", "Kaunas", "Rīga", "Daugavpils", "Tallinn", "Tartu", "Pärnu"),
               "Lithuania"),
    "usa": (("Chicago", "Houston", "Phoenix", "San Antonio", "Denver", "Seattle", "Boston",
             "Atlanta", "Miami", "Portland", "Albuquerque", "Des Moines", "New York"),
            "United States"),
    "uk": (("Manchester", "Leeds", "Bristol", "Glasgow", "Cardiff", "Birmingham", "Belfast",
            "Newcastle upon Tyne", "Edinburgh", "Norwich", "London"), "United Kingdom"),
    "ireland": (("Dublin", "Cork", "Galway", "Limerick", "Sligo", "Waterford",
                 "Dún Laoghaire", "Kilkenny"), "Ireland"),
    "caucasus": (("Bakı", "Gəncə", "Sumqayıt", "Tbilisi"), "Azerbaijan"),
    "mexico": (("Ciudad de México", "Guadalajara", "Monterrey", "Puebla", "Mérida",
                "Querétaro", "Tijuana"), "México"),
    "brazil": (("São Paulo", "Rio de Janeiro", "Belo Horizonte", "Curitiba", "Porto Alegre",
                "Florianópolis", "Brasília"), "Brasil"),
}
LOCALE_CITIES: dict[str, str] = {
    "en_NG": "nigeria", "yo_NG": "nigeria", "ig_NG": "nigeria", "ha_NG": "nigeria",
    "ar": "arab", "ja_JP": "japan", "zh_CN": "china", "zh_TW": "taiwan",
    "en_PK": "pakistan", "en_KE": "kenya", "sw": "kenya", "tw_GH": "ghana",
    "zu_ZA": "southafrica", "tr_TR": "turkey", "lt_LT": "baltic", "lv_LV": "baltic",
    "et_EE": "baltic", "az_AZ": "caucasus", "es_MX": "mexico", "pt_BR": "brazil", "ga_IE": "ireland",
}
COUNTRIES: dict[str, str] = {
    "en_US": "United States", "en_GB": "United Kingdom", "en_IE": "Ireland",
    "en_IN": "India", "de_DE": "Germany", "de_AT": "Austria", "de_CH": "Switzerland",
    "fr_FR": "France", "fr_DZ": "Algeria", "es_ES": "Spain", "it_IT": "Italy",
    "pl_PL": "Poland", "pt_PT": "Portugal", "nl_NL": "the Netherlands", "nl_BE": "Belgium",
    "sv_SE": "Sweden", "da_DK": "Denmark", "no_NO": "Norway", "fi_FI": "Finland",
    "cs_CZ": "Czech Republic", "sk_SK": "Slovakia", "hu_HU": "Hungary", "ro_RO": "Romania",
    "hr_HR": "Croatia", "sl_SI": "Slovenia", "vi_VN": "Vietnam", "id_ID": "Indonesia",
    "en_NG": "Nigeria", "yo_NG": "Nigeria", "ig_NG": "Nigeria", "ha_NG": "Nigeria",
    "en_PK": "Pakistan", "en_KE": "Kenya", "tr_TR": "Turkey", "es_MX": "Mexico",
    "pt_BR": "Brazil",
}
LOCAL_COUNTRY_NAMES: tuple[str, ...] = (
    "Deutschland", "Polska", "España", "Österreich", "Schweiz", "Italia", "Sverige",
    "Danmark", "Norge", "Suomi", "Česko", "Magyarország", "Nederland", "België", "UK",
    "USA", "the US", "Éire", "Türkiye", "Việt Nam", "Brasil", "México", "Nigeria",
)
ARAB_FIRST: tuple[str, ...] = (
    "Mohammed", "Muhammad", "Ahmad", "Ahmed", "Fatima", "Aisha", "Omar", "Youssef",
    "Khaled", "Layla", "Mariam", "Hassan", "Hussein", "Nour", "Rania", "Tariq", "Samir",
    "Zainab", "Karim", "Abdullah", "Salma", "Yasmin", "Hamza", "Bilal", "Amira", "Leila",
    "Mustafa", "Ibrahim", "Rashid", "Hana", "Walid", "Nadia", "Jamal", "Soraya", "Idris",
)
ARAB_LAST: tuple[str, ...] = (
    "Al-Sayed", "El-Amin", "Haddad", "Khalil", "Mansour", "Nasser", "Saleh", "Abu-Bakr",
    "Al-Farsi", "Hamdan", "Darwish", "Qureshi", "Aziz", "Rahman", "Ibrahim", "Abdelkader",
    "Benali", "Bouzid", "El Idrissi", "Al Mansouri", "Bin Laden", "Abdel-Rahman",
    "Al-Hashimi", "Chaouch", "Touati", "Benjelloun", "Haddadi", "Al-Khatib", "Said",
)
PARTICLES: dict[str, tuple[str, ...]] = {
    "nl": ("van", "van der", "van den", "de", "ter"), "de": ("von", "von der", "zu"),
    "fr": ("de", "Le", "du", "de la"), "it": ("De", "Di", "Lo", "Dalla"),
    "es": ("de", "de la", "del"), "pt": ("da", "dos", "de"), "en": ("O'", "Mc", "Mac"),
    "ga": ("O'", "Mac", "Ní"),
}
TITLES: tuple[str, ...] = ("Mr.", "Mrs.", "Ms.", "Dr.", "Mr", "Mrs", "Ms", "Dr", "Prof.",
                           "Miss")
NATIONALITIES: tuple[str, ...] = (
    "Polish", "Nigerian", "German", "French", "Spanish", "Italian", "Mexican", "Brazilian",
    "Turkish", "Vietnamese", "Indian", "Pakistani", "Chinese", "Japanese", "Dutch",
    "Swedish", "Danish", "Norwegian", "Finnish", "Irish", "British", "American", "Kenyan",
    "Ghanaian", "Moroccan", "Algerian", "Egyptian", "Syrian", "Ukrainian", "Romanian",
    "Hungarian", "Czech", "Slovak", "Croatian", "Portuguese", "Filipino", "Indonesian",
    "Yoruba", "Igbo", "Hausa", "Kurdish", "Lebanese", "Somali", "Tamil", "Punjabi",
)
RELIGIONS: tuple[str, ...] = (
    "Muslim", "Catholic", "Jewish", "Hindu", "Sikh", "Buddhist", "Protestant",
    "Orthodox", "Christian", "Evangelical", "Lutheran", "Mormon", "Jehovah's Witness",
)
BANKS: tuple[str, ...] = (
    "Deutsche Bank", "Commerzbank", "Sparkasse {city}", "PKO Bank Polski", "mBank",
    "Santander", "BBVA", "CaixaBank", "BNP Paribas", "Crédit Agricole", "Société Générale",
    "ING", "Rabobank", "ABN AMRO", "Barclays", "HSBC", "Lloyds Bank", "NatWest", "Monzo",
    "Revolut", "N26", "Nordea", "Danske Bank", "Swedbank", "Handelsbanken", "UniCredit",
    "Intesa Sanpaolo", "Raiffeisen Bank", "Erste Bank", "OTP Bank", "Garanti BBVA",
    "Access Bank", "GTBank", "Zenith Bank", "First Bank of Nigeria", "Equity Bank",
    "Wells Fargo", "Chase", "Bank of America", "Citibank", "Banco do Brasil", "Itaú",
    "Bradesco", "Banorte", "Vietcombank", "{last} Savings Bank", "{city} Credit Union",
    "Banco {last}", "Bank {last}", "First {city} Bank",
)
TELCOS: tuple[str, ...] = (
    "Vodafone", "Orange", "T-Mobile", "Telefónica", "Movistar", "Play", "Plus", "O2",
    "EE", "Three", "MTN", "Airtel", "Glo", "Safaricom", "Telia", "Telenor", "Swisscom",
    "Proximus", "KPN", "Verizon", "AT&T", "Turkcell", "Viettel", "Jio", "Bouygues Telecom",
)
INSURERS: tuple[str, ...] = (
    "Allianz", "AXA", "Generali", "Zurich Insurance", "Aviva", "PZU", "Mapfre", "Ergo",
    "HUK-Coburg", "Warta", "Achmea", "If Skadeförsäkring", "Leadway Assurance",
    "{last} Versicherung AG", "{last} Insurance Ltd", "{last} Assurances S.A.",
)
HOSPITALS: tuple[str, ...] = (
    "St. Mary's Hospital", "{city} General Hospital", "Klinikum {city}",
    "Hôpital {last}", "Szpital Wojewódzki w {city}", "Hospital Universitario {last}",
    "Lagos University Teaching Hospital", "Charité", "{city} Medical Centre",
    "Clínica {last}", "{last} Family Practice", "Ospedale San {first}",
    "Sint-{first}ziekenhuis", "Royal {city} Infirmary",
)
UNIVERSITIES: tuple[str, ...] = (
    "University of {city}", "Uniwersytet Jagielloński", "Technische Universität {city}",
    "Université {last}", "Universidad de {city}", "{city} State University",
    "Obafemi Awolowo University", "University of Ibadan", "Politecnico di Milano",
    "KU Leuven", "Universiteit van Amsterdam", "{city} Institute of Technology",
    "Boğaziçi University", "Universidade de São Paulo",
)
SUFFIXES: tuple[str, ...] = (
    "LLC", "Inc.", "Ltd", "Ltd.", "GmbH", "AG", "Sp. z o.o.", "S.A.", "S.L.", "SAS",
    "S.r.l.", "B.V.", "N.V.", "AB", "Oy", "ApS", "A/S", "s.r.o.", "Kft.", "Plc",
    "Pvt. Ltd.", "Limited", "& Co. KG", "S.p.A.", "Lda.",
)
INDUSTRIES: tuple[str, ...] = (
    "Logistics", "Consulting", "Software", "Solutions", "Trading", "Foods", "Textiles",
    "Engineering", "Media", "Holdings", "Systems", "Partners", "Transport", "Energy",
    "Technologies", "Pharma", "Retail", "Construction", "Digital", "Group",
)
COMPANY_STEMS: tuple[str, ...] = (
    "Nordwind", "Bluefin", "Kestrel", "Altavia", "Polmex", "Sunleaf", "Brightway",
    "Zefir", "Orbita", "Lumina", "Vistula", "Adunni", "Sakura", "Korvo", "Helix",
    "Quantis", "Meridian", "Tekno", "Rivella", "Baobab", "Oakridge", "Falcon",
)
JOBS: tuple[str, ...] = (
    "Customer Success Manager", "Accountant", "Software Engineer", "HR Business Partner",
    "Office Manager", "Nurse", "Claims Handler", "Sales Director", "Project Manager",
    "Head of Finance", "Operations Lead", "Data Analyst", "Pharmacist", "Teacher",
    "Logistics Coordinator", "Account Executive", "Marketing Specialist", "CTO",
)
# Capitalised non-PII words: products, plans, payment methods, UI names.
PRODUCTS: tuple[str, ...] = (
    "iPhone 15", "Galaxy S23", "Pixel 8", "Kindle", "PlayStation 5", "MacBook Air",
    "Surface Pro", "ThinkPad", "AirPods", "Fire TV Stick", "Echo Dot", "Router X200",
    "SmartHome Hub", "Fibre 500", "Unlimited Max", "Premium Plan", "Gold Plus",
    "Family Bundle", "Business Pro", "Basic Saver",
)
PAYMENTS: tuple[str, ...] = ("Visa", "Mastercard", "Apple Pay", "Google Pay", "PayPal",
                             "Amex", "Maestro", "BLIK", "SEPA Direct Debit", "Klarna")
APP_WORDS: tuple[str, ...] = (
    "Settings", "My Account", "Billing", "Help Center", "Two-Factor Authentication",
    "Dark Mode", "Online Banking", "Mobile App", "Customer Portal", "Order History",
    "Notifications", "Privacy Settings", "Wi-Fi", "Bluetooth", "Android", "iOS",
    "Windows", "Chrome", "Excel", "PDF", "Face ID", "Touch ID",
)
MONTHS: tuple[str, ...] = ("January", "February", "March", "April", "May", "June", "July",
                           "August", "September", "October", "November", "December")
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                             "Saturday", "Sunday")
CC: dict[str, str] = {
    "en_US": "1", "en_GB": "44", "en_IE": "353", "en_IN": "91", "de_DE": "49", "de_AT": "43",
    "de_CH": "41", "fr_FR": "33", "fr_DZ": "213", "es_ES": "34", "it_IT": "39",
    "pl_PL": "48", "pt_PT": "351", "nl_NL": "31", "nl_BE": "32", "sv_SE": "46",
    "da_DK": "45", "no_NO": "47", "fi_FI": "358", "cs_CZ": "420", "sk_SK": "421",
    "hu_HU": "36", "ro_RO": "40", "hr_HR": "385", "sl_SI": "386", "vi_VN": "84",
    "id_ID": "62", "en_NG": "234", "yo_NG": "234", "ig_NG": "234", "ha_NG": "234",
    "en_PK": "92", "en_KE": "254", "tr_TR": "90", "es_MX": "52", "pt_BR": "55",
}
FREE_MAIL: tuple[str, ...] = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com",
                              "wp.pl", "web.de", "gmx.de", "orange.fr", "libero.it",
                              "icloud.com", "proton.me", "yahoo.co.uk", "mail.ru")


def _ascii(text: str) -> str:
    """A name as it would appear in an e-mail address: no diacritics, letters only."""
    special = str.maketrans({"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "æ": "ae", "ß": "ss",
                             "đ": "d", "Đ": "D", "ı": "i", "ə": "e", "Ə": "E", "þ": "th"})
    folded = unicodedata.normalize("NFKD", text.translate(special))
    return "".join(c for c in folded if c.isascii() and c.isalpha())


class _Row:
    """One row under construction: the persona(s), and Faker per locale."""

    def __init__(self, gen: _Gen) -> None:
        self.g = gen
        self.rng = gen.rng
        self.people: dict[str, dict[str, str]] = {}
        self.cache: dict[str, list[Piece]] = {}

    def person(self, key: str = "") -> dict[str, str]:
        if key not in self.people:
            self.people[key] = self.g.new_person()
        return self.people[key]


class _Gen:
    def __init__(self, seed: int) -> None:
        from faker import Faker

        self._faker_cls = Faker
        self.seed = seed
        self.rng = random.Random(seed)
        self._fakers: dict[str, Any] = {}
        self._loc_names = list(NAME_LOCALES)
        self._loc_weights = [NAME_LOCALES[k] for k in self._loc_names]

    def fk(self, locale: str) -> Any:
        f = self._fakers.get(locale)
        if f is None:
            f = self._faker_cls(locale)
            f.seed_instance(self.seed * 7919 + sorted(
                set(NAME_LOCALES) | set(PLACE_LOCALES) | set(IBAN_LOCALES)).index(locale))
            self._fakers[locale] = f
        return f

    # --- people and places -------------------------------------------------------------

    def _name_parts(self, loc: str) -> tuple[str, str]:
        r = self.rng
        if loc == "ar":
            return r.choice(ARAB_FIRST), r.choice(ARAB_LAST)
        f = self.fk(loc)
        if loc in ("ja_JP", "zh_CN", "zh_TW"):
            first, last = f.first_romanized_name(), f.last_romanized_name()
            return first.title(), last.title()
        first, last = f.first_name(), f.last_name()
        lang = loc.split("_")[0]
        if lang == "en" and loc not in ("en_US", "en_GB", "en_IE"):
            lang = ""  # no O'/Mc on Indian, Nigerian, Pakistani or Kenyan names
        u = r.random()
        if u < 0.10:  # double-barrelled
            last = f"{last}-{f.last_name()}"
        elif u < 0.16 and lang == "es":
            last = f"{last} {f.last_name()}"
        elif u < 0.26 and lang in PARTICLES and " " not in last:
            p = r.choice(PARTICLES[lang])
            last = f"{p}{last}" if p.endswith("'") or p in ("Mc", "Mac") else f"{p} {last}"
        return first, last

    def new_person(self) -> dict[str, str]:
        r = self.rng
        loc = r.choices(self._loc_names, self._loc_weights)[0]
        first, last = self._name_parts(loc)
        full = f"{first} {last}"
        if r.random() < 0.08 and loc not in ("ar", "ja_JP", "zh_CN", "zh_TW"):
            full = f"{first} {r.choice(string.ascii_uppercase)}. {last}"
        elif r.random() < 0.05:
            full = f"{last}, {first}" if r.random() < 0.5 else f"{last.upper()} {first}"
        if loc in PLACE_LOCALES or (loc in PLACE_EXTRA and r.random() < 0.5):
            place = loc
        else:
            place = r.choice(PLACE_LOCALES)
        return {"loc": loc, "place": place, "first": first,
                "last": last, "full": full, "title": r.choice(TITLES)}

    def city_of(self, loc: str) -> str:
        key = LOCALE_CITIES.get(loc)
        if key is None and loc in ("en_US", "en_GB") and self.rng.random() < 0.6:
            key = "usa" if loc == "en_US" else "uk"
        if key is not None:
            return self.rng.choice(CITIES[key][0])
        return str(self.fk(loc).city())

    def city(self, p: dict[str, str], native: bool = True) -> str:
        if not native:
            return self.city_of(self.rng.choice(PLACE_LOCALES + PLACE_EXTRA))
        return self.city_of(p["loc"] if self.rng.random() < 0.7 else p["place"])

    def country(self, p: dict[str, str]) -> str:
        r = self.rng.random()
        key = LOCALE_CITIES.get(p["loc"])
        if r < 0.15:
            return self.rng.choice(LOCAL_COUNTRY_NAMES)
        if key is not None and r < 0.7:
            return CITIES[key][1]
        if r < 0.85:
            return COUNTRIES[p["place"]]
        return str(self.fk("en_US").country())

    def street(self, p: dict[str, str]) -> str:
        s = str(self.fk(p["place"]).street_address()).replace("\n", ", ").strip()
        if self.rng.random() < 0.12 and not s[-1].isdigit():
            s += f" {self.rng.randint(1, 120)}"
        return s

    def org_from(self, pool: tuple[str, ...], p: dict[str, str]) -> str:
        t = self.rng.choice(pool)
        if "{" not in t:
            return t
        other = self.new_person()
        return t.format(city=self.city(p), last=other["last"], first=other["first"])

    def company(self, p: dict[str, str]) -> str:
        r = self.rng
        u = r.random()
        if u < 0.35:
            # Faker's companies are often surnames alone ("Ugrinić", "Qais-Sadeed", "Smith,
            # Jones and Garcia"): with no legal suffix, a model learns that a surname is an
            # organisation and stops redacting names, so one is always added
            name = str(self.fk(p["place"]).company())
            if not any(name.endswith(s) for s in SUFFIXES):
                name = f"{name} {r.choice(SUFFIXES)}"
            return name
        if u < 0.7:
            return f"{r.choice(COMPANY_STEMS)} {r.choice(INDUSTRIES)} {r.choice(SUFFIXES)}"
        if u < 0.85:
            return f"{self.new_person()['last']} {r.choice(INDUSTRIES)}"
        return f"{r.choice(COMPANY_STEMS)}{r.choice(('', 'Tech', 'Soft', 'Net', 'Pay'))}"

    # --- structured values -------------------------------------------------------------

    def digits(self, n: int) -> str:
        return "".join(self.rng.choice(string.digits) for _ in range(n))

    def phone(self, p: dict[str, str]) -> str:
        r = self.rng
        loc = p["place"]
        u = r.random()
        if u < 0.45:
            return str(self.fk(loc).phone_number())
        cc = CC[loc]
        if u < 0.75:
            groups = [self.digits(3), self.digits(3), self.digits(3)]
            return f"+{cc} " + r.choice((" ", "-", "")).join(groups)
        if u < 0.9:
            return f"00{cc} {self.digits(3)} {self.digits(2)} {self.digits(2)} {self.digits(2)}"
        return f"0{self.digits(3)} {self.digits(6)}"

    def email(self, p: dict[str, str]) -> str:
        r = self.rng
        first, last = _ascii(p["first"]).lower(), _ascii(p["last"]).lower()
        user = r.choice((f"{first}.{last}", f"{first}{last}", f"{first[:1]}{last}",
                         f"{first}_{last}{r.randint(1, 99)}", f"{last}.{first}",
                         f"{first}{r.randint(70, 2005)}"))
        dom = r.choice(FREE_MAIL) if r.random() < 0.7 else str(self.fk("en_US").domain_name())
        return f"{user or 'info'}@{dom}"

    def iban(self) -> str:
        raw = str(self.fk(self.rng.choice(IBAN_LOCALES)).iban())
        if self.rng.random() < 0.5:
            return " ".join(raw[i:i + 4] for i in range(0, len(raw), 4))
        return raw

    def card(self) -> str:
        r = self.rng
        num = str(self.fk("en_US").credit_card_number(
            card_type=r.choice(("visa16", "mastercard", "amex", "discover", "jcb", None))))
        if len(num) == 16 and r.random() < 0.6:
            sep = r.choice((" ", "-"))
            return sep.join(num[i:i + 4] for i in range(0, 16, 4))
        return num

    def ssn(self) -> str:
        s = str(self.fk("en_US").ssn())
        return s.replace("-", "" if self.rng.random() < 0.5 else " ") \
            if self.rng.random() < 0.25 else s

    def licence(self) -> str:
        r = self.rng
        return r.choice((
            f"{r.choice(string.ascii_uppercase)}{self.digits(7)}",
            f"{r.choice(string.ascii_uppercase)}{self.digits(3)}-{self.digits(4)}-{self.digits(4)}",
            self.digits(9), f"{self.digits(3)}-{self.digits(3)}-{self.digits(3)}",
            f"{r.choice(string.ascii_uppercase)}{r.choice(string.ascii_uppercase)}{self.digits(6)}",
        ))

    def passport(self) -> str:
        r = self.rng
        return r.choice((self.digits(9), str(self.fk("en_US").passport_number()),
                         f"{r.choice(string.ascii_uppercase)}{self.digits(8)}"))

    def account(self) -> str:
        n = self.rng.randint(8, 14)
        return self.digits(n)

    def date(self, dob: bool = False) -> str:
        r = self.rng
        f = self.fk("en_US")
        d = f.date_of_birth(minimum_age=18, maximum_age=90) if dob else \
            f.date_between(start_date="-3y", end_date="+1y")
        m = MONTHS[d.month - 1]
        fmt = r.randrange(9)
        return (f"{d.month}/{d.day}/{d.year}", f"{d.day:02d}/{d.month:02d}/{d.year}",
                f"{d.day:02d}.{d.month:02d}.{d.year}", d.isoformat(),
                f"{m} {d.day}, {d.year}", f"{d.day} {m} {d.year}", f"{d.day} {m[:3]} {d.year}",
                f"{m} {d.day}", f"{d.day}-{d.month:02d}-{d.year}")[fmt]

    def time(self) -> str:
        r = self.rng
        h, mi = r.randint(0, 23), r.choice((0, 15, 30, 45, r.randint(0, 59)))
        return r.choice((f"{h:02d}:{mi:02d}", f"{(h % 12) or 12}:{mi:02d} {'am' if h < 12 else 'pm'}",
                         f"{(h % 12) or 12}{'am' if h < 12 else 'pm'}", f"{h}.{mi:02d}"))


# Slot name -> pieces. A slot's value is drawn once per row (so "{name}" twice is one name).
def _slots() -> dict[str, Callable[[_Row], list[Piece]]]:
    def one(kind: str, fn: Callable[[_Row], str]) -> Callable[[_Row], list[Piece]]:
        return lambda row: [(kind, fn(row))]

    def titled(row: _Row, key: str = "") -> list[Piece]:
        p = row.person(key)
        who = p["last"] if row.rng.random() < 0.6 else f"{p['first']} {p['last']}"
        return [("TITLE", p["title"]), " ", ("PERSON", who)]

    def full_addr(row: _Row) -> list[Piece]:
        g, p, r = row.g, row.person(), row.rng
        street = ("STREET_ADDRESS", g.street(p))
        city = ("GPE", g.city_of(p["place"]))
        if p["place"] == "en_US":
            f = g.fk("en_US")
            state = str(f.state_abbr() if r.random() < 0.6 else f.state())
            out: list[Piece] = [street, ", ", city, ", ", ("GPE", state), " ",
                                ("ZIP_CODE", str(f.zipcode()))]
        elif p["place"] in ("en_GB", "en_IE", "en_IN"):
            out = [street, ", ", city, r.choice((", ", " ")),
                   ("ZIP_CODE", str(g.fk(p["place"]).postcode()))]
        else:
            out = [street, r.choice((", ", "\n", ", ")),
                   ("ZIP_CODE", str(g.fk(p["place"]).postcode())), " ", city]
        if r.random() < 0.4:
            out += [r.choice((", ", "\n")), ("GPE", COUNTRIES[p["place"]])]
        return out

    return {
        "name": one("PERSON", lambda w: w.person()["full"]),
        "first": one("PERSON", lambda w: w.person()["first"]),
        "last": one("PERSON", lambda w: w.person()["last"]),
        "titled": titled,
        "sibling": one("PERSON", lambda w: f"{w.person('2')['first']} {w.person()['last']}"),
        "name2": one("PERSON", lambda w: w.person("2")["full"]),
        "first2": one("PERSON", lambda w: w.person("2")["first"]),
        "titled2": lambda w: titled(w, "2"),
        "agent": one("PERSON", lambda w: w.person("agent")["first"]),
        "city": one("GPE", lambda w: w.g.city(w.person())),
        "city2": one("GPE", lambda w: w.g.city(w.person("2"), native=w.rng.random() < 0.5)),
        "country": one("GPE", lambda w: w.g.country(w.person())),
        "addr": one("STREET_ADDRESS", lambda w: w.g.street(w.person())),
        "full_addr": full_addr,
        "zip": one("ZIP_CODE", lambda w: str(w.g.fk(w.person()["place"]).postcode())),
        "org": one("ORGANIZATION", lambda w: w.g.company(w.person())),
        "org2": one("ORGANIZATION", lambda w: w.g.company(w.person("2"))),
        "bank": one("ORGANIZATION", lambda w: w.g.org_from(BANKS, w.person())),
        "telco": one("ORGANIZATION", lambda w: w.g.org_from(TELCOS, w.person())),
        "insurer": one("ORGANIZATION", lambda w: w.g.org_from(INSURERS, w.person())),
        "hospital": one("ORGANIZATION", lambda w: w.g.org_from(HOSPITALS, w.person())),
        "uni": one("ORGANIZATION", lambda w: w.g.org_from(UNIVERSITIES, w.person())),
        "nrp": one("NRP", lambda w: w.rng.choice(NATIONALITIES)),
        "religion": one("NRP", lambda w: w.rng.choice(RELIGIONS)),
        "date": one("DATE_TIME", lambda w: w.g.date()),
        "date2": one("DATE_TIME", lambda w: w.g.date()),
        "dob": one("DATE_TIME", lambda w: w.g.date(dob=True)),
        "time": one("DATE_TIME", lambda w: w.g.time()),
        "weekday": one("DATE_TIME", lambda w: w.rng.choice(WEEKDAYS)),
        "month": one("DATE_TIME", lambda w: w.rng.choice(MONTHS)),
        "year": one("DATE_TIME", lambda w: str(w.rng.randint(1975, 2025))),
        "age": one("AGE", lambda w: str(w.rng.randint(18, 92))),
        "job": one("TITLE", lambda w: w.rng.choice(JOBS)),
        "phone": one("PHONE_NUMBER", lambda w: w.g.phone(w.person())),
        "phone2": one("PHONE_NUMBER", lambda w: w.g.phone(w.person("2"))),
        "email": one("EMAIL_ADDRESS", lambda w: w.g.email(w.person())),
        "email2": one("EMAIL_ADDRESS", lambda w: w.g.email(w.person("2"))),
        "card": one("CREDIT_CARD", lambda w: w.g.card()),
        "iban": one("IBAN_CODE", lambda w: w.g.iban()),
        "ssn": one("US_SSN", lambda w: w.g.ssn()),
        "dl": one("US_DRIVER_LICENSE", lambda w: w.g.licence()),
        "passport": one("US_PASSPORT", lambda w: w.g.passport()),
        "acct": one("US_BANK_NUMBER", lambda w: w.g.account()),
        "ip": one("IP_ADDRESS", lambda w: str(w.g.fk("en_US").ipv4_public() if w.rng.random()
                                              < 0.85 else w.g.fk("en_US").ipv6())),
        "url": one("URL", lambda w: str(w.g.fk("en_US").uri())),
        "domain": one("DOMAIN_NAME", lambda w: str(w.g.fk("en_US").domain_name())),
        # Unlabelled fillers: digit groups and capitalised words that are not PII.
        "amount": lambda w: [w.rng.choice(("€", "$", "£", "PLN ", "")) + f"{w.rng.randint(5, 4000)}"
                             + w.rng.choice((".00", ",50", f".{w.rng.randint(10, 99)}", ""))],
        "order": lambda w: [w.rng.choice(("#", "ORD-", "", "A")) + w.g.digits(w.rng.randint(5, 9))],
        "ticket": lambda w: [w.rng.choice(("#", "TCK-", "INC", "CS-")) + w.g.digits(6)],
        "code": lambda w: [w.g.digits(w.rng.choice((4, 6, 8)))],
        "last4": lambda w: [w.g.digits(4)],
        "product": lambda w: [w.rng.choice(PRODUCTS)],
        "pay": lambda w: [w.rng.choice(PAYMENTS)],
        "appword": lambda w: [w.rng.choice(APP_WORDS)],
        "count": lambda w: [str(w.rng.randint(2, 30))],
    }


# Templates: (style, text). Styles: "ticket", "mail", "chat", "form", "neg".
TEMPLATES: tuple[tuple[str, str], ...] = (
    # -- support tickets ------------------------------------------------------------------
    ("ticket", "Hi, my name is {name} and I can't log in to my account since {weekday}. "
               "My registered email is {email}."),
    ("ticket", "Hello, I am writing on behalf of my mother, {name2}. She lives at {full_addr} "
               "and needs her bills sent there."),
    ("ticket", "Customer {name} (DOB {dob}) called about order {order}; please call back on "
               "{phone}."),
    ("ticket", "Please update my address to {full_addr}. Thanks, {first}"),
    ("ticket", "I moved from {city2} to {city} in {month} and my parcel still goes to the old "
               "address."),
    ("ticket", "The refund of {amount} for order {order} was supposed to go to IBAN {iban}, "
               "account holder {name}."),
    ("ticket", "Our technician {first2} visited {titled} on {date} at {time} but nobody was "
               "home at {addr}."),
    ("ticket", "Ticket {ticket}: {name} reports that the {product} stopped charging after the "
               "update on {date}."),
    ("ticket", "I ordered a {product} on {date} and paid with {pay}, but {org} never shipped it."),
    ("ticket", "Can you please delete all data you hold about me? Name: {name}, email: {email}, "
               "phone: {phone}."),
    ("ticket", "My login is {email} and I keep getting an error from IP {ip} when "
               "I open {url}"),
    ("ticket", "{titled} has asked us to close the account {acct} at {bank} by {date}."),
    ("ticket", "Hello support, {sibling} here, {first}'s {nrp} colleague. We both work at "
               "{org} in {city}."),
    ("ticket", "Package for {name} was left with a neighbour at {addr} instead of {zip} {city}."),
    ("ticket", "Please note my new phone number {phone}; the old one on file for {name} is no "
               "longer in use."),
    ("ticket", "The invoice for {org} (VAT ID {code}{code}) should be addressed to {name}, "
               "{full_addr}."),
    ("ticket", "I was charged twice for my {product} subscription ({amount}). The card is "
               "{card}, expiry {month} {year}."),
    ("ticket", "Hi, {first} from {org} again. The delivery to {city} on {weekday} was missing "
               "{count} boxes."),
    ("ticket", "Login attempts from {ip} and {ip} were blocked for {email}. User: {name}."),
    ("ticket", "My son {first2} ({age}) needs a separate SIM on our {telco} family plan."),
    # -- e-mails ----------------------------------------------------------------------------
    ("mail", "Dear {titled},\n\nThank you for contacting {bank}. Your new card ending in "
             "{last4} will arrive at {addr} within {count} working days.\n\nKind regards,\n"
             "{name2}\n{job}\n{bank}"),
    ("mail", "Hello,\n\nplease find attached my CV. I studied at {uni} and worked as a {job} "
             "at {org} until {year}.\n\nBest,\n{name}\n{phone}\n{email}"),
    ("mail", "Hi {first2},\n\nas discussed on {weekday}, I am sending my bank details for "
             "the reimbursement:\n\nAccount holder: {name}\nIBAN: {iban}\nBank: {bank}\n\n"
             "Cheers,\n{first}"),
    ("mail", "Dear Sir or Madam,\n\nI would like to file a claim with {insurer} for the damage "
             "at {full_addr} on {date}. Policy number {order}.\n\nYours faithfully,\n{titled}"),
    ("mail", "Good morning {titled2},\n\nyour appointment at {hospital} is confirmed for "
             "{date} at {time}. Please bring your ID.\n\n{name}\nPatient Services"),
    ("mail", "Hi team,\n\n{name2} joins us from {org2} on {date} as {job}. Her desk is in the "
             "{city} office.\n\nThanks,\n{first}"),
    ("mail", "{name}\n{job}\n{org}\n{full_addr}\nTel: {phone}\nMail: {email}\nWeb: {domain}"),
    ("mail", "Dear {first},\n\nwe could not verify the payment from {iban}. Please contact "
             "us at {phone} quoting reference {ticket}.\n\n{org} Customer Care"),
    ("mail", "Hello {first2}, this is {name} from {city}. My {nrp} passport number is "
             "{passport} and it expires in {year}."),
    ("mail", "Dear HR,\n\nI, {name}, born {dob} in {city}, request a copy of my employment "
             "contract with {org}.\n\nRegards,\n{name}\n{email}"),
    ("mail", "Re: claim {ticket}\n\nHi {first},\nthe garage {org2} in {city2} has sent the "
             "invoice ({amount}).\n\n-- \n{name2} | {insurer} | {phone2}"),
    ("mail", "Dear {titled},\nyour new {telco} contract starts on {date}. Your number {phone} "
             "will be ported automatically.\n\nBest regards\n{agent}"),
    ("mail", "Hello,\nI am {name}, a {nrp} student at {uni}. Could you confirm my enrollment "
             "for {month} {year}?\nThank you,\n{first}"),
    ("mail", "From: {name} <{email}>\nTo: {email2}\nSubject: meeting on {weekday}\n\nHi "
             "{first2}, can we move it to {time}? {first}"),
    ("mail", "Dear {first2},\n\nMy wife {name} and I are {religion} and would like a "
             "vegetarian meal on our flight on {date}.\n\nMany thanks,\n{titled2}"),
    ("mail", "Good afternoon,\n\nplease update the payroll for {name} (employee no. {order}, "
             "SSN {ssn}). New account: {acct} at {bank}.\n\n{name2}\n{job}"),
    ("mail", "Hi,\nthe contractor {org} from {city} will visit {addr} on "
             "{weekday}.\n\nPozdrawiam,\n{name}"),
    ("mail", "Dear {titled},\n\nwe received your driving licence {dl} and proof of address "
             "({full_addr}). Your application is complete.\n\n{org} Team"),
    # -- chat -------------------------------------------------------------------------------
    ("chat", "hi its {first} my card got blocked again"),
    ("chat", "hello my name is {name} i need help with my bill"),
    ("chat", "pls send the new card to {addr} {city} not the old one"),
    ("chat", "hey {agent} thanks, the iban is {iban}"),
    ("chat", "my dob is {dob} and postcode {zip}"),
    ("chat", "ok so i called {telco} and they said {org} has my number {phone}"),
    ("chat", "this is {sibling} im the sister of {first}, she is in hospital in {city}"),
    ("chat", "ssn {ssn} name {name}"),
    ("chat", "cant login on my {product} since {weekday} help"),
    ("chat", "yes its {email}"),
    ("chat", "i live in {city} near {org}"),
    ("chat", "can {first2} pick up the parcel for me? she has my id"),
    ("chat", "{name} here, account {acct}"),
    ("chat", "im {age} years old and {nrp}, do i need a visa"),
    ("chat", "hi {agent} my husband {first2} will call u at {time}"),
    ("chat", "the guy from {bank} was {titled2}, he said to write here"),
    ("chat", "moved to {country} last {month} so update pls"),
    ("chat", "address is {full_addr}"),
    ("chat", "my licence number is {dl} and it expires {date}"),
    ("chat", "number changed to {phone} thx"),
    ("chat", "booking for {name} and {name2} on {date}"),
    ("chat", "transfer to {name2} {iban} didnt arrive"),
    ("chat", "{name} dob {dob} card {card}"),
    ("chat", "ask for {first2} at {hospital} reception"),
    # -- forms and requests -----------------------------------------------------------------
    ("form", "Name: {name}\nDate of birth: {dob}\nAddress: {full_addr}\nPhone: {phone}\n"
             "Email: {email}"),
    ("form", "Full name: {titled}\nNationality: {nrp}\nPassport no.: {passport}\n"
             "Place of birth: {city}, {country}"),
    ("form", "Account holder: {name}\nBank: {bank}\nIBAN: {iban}\nReference: {ticket}"),
    ("form", "Patient: {name}, {age} y/o, {religion}\nReferred by: {titled2}, {hospital}\n"
             "Appointment: {date} {time}"),
    ("form", "Employee: {name}\nDepartment: {job}\nStart date: {date}\nSSN: {ssn}\n"
             "Routing/account: {acct}"),
    ("form", "Cardholder: {name}\nCard number: {card}\nBilling address: {full_addr}"),
    ("form", "Driver: {name}\nLicence: {dl}\nVehicle registered in {city}"),
    ("form", "Applicant {name}, aged {age}, currently living in {city}, works for {org}."),
    ("form", "Emergency contact: {name2} ({phone2}), {addr}, {city2}"),
    ("form", "Beneficiary: {name2}\nRelationship: sister\nIBAN: {iban}\nCountry: {country}"),
    ("form", "Policy holder {titled} ({email}) requests cancellation effective {date}."),
    ("form", "Ship to: {name}, {org}, {full_addr}"),
    ("form", "Website {url} was visited from {ip} by user {email} on {date} at {time}."),
    ("form", "Insured person: {name}; employer: {org}; diagnosis date: {date}; "
             "hospital: {hospital}"),
    ("form", "Student {name} ({nrp}) enrolled at {uni} in {year}; contact {email}."),
    ("form", "I, {name}, residing at {full_addr}, authorise {bank} to debit account {acct}."),
    ("form", "Caller: {first} (surname {last}), born {dob}, SSN ending {last4}, phone {phone}"),
    ("form", "Tenant {titled} of {addr}, {zip} {city} has paid rent to {name2} until {date}."),
    ("form", "Home page: {domain}. Contact {name} on {phone} or at {email}."),
    ("form", "Visa application: {name}, {nrp} citizen, passport {passport}, arriving {date} "
             "in {city2}."),
    ("form", "Loan request {ticket}: {name}, {age}, employed at {org} since {year}, salary "
             "paid to {iban}."),
    ("form", "Prescription for {titled}, DOB {dob}, issued by {titled2} at {hospital}."),
    ("form", "Holder {name}, card {card}, was charged {amount} by {org} in {city} on {date}."),
    ("form", "SIM swap request: {name}, {telco} number {phone}, ID {dl}, from IP {ip}."),
)
# Negatives: no PII, or capitalised non-PII words; dates/weekdays/months still labelled.
NEGATIVES: tuple[str, ...] = (
    "My {pay} card was declined when I tried to pay with {pay}.",
    "Where do I find the IBAN field in {appword}?",
    "The SSN field in the form does not accept dashes, is that a bug?",
    "How do I turn on {appword} in the {product} app?",
    "Is the {product} available in black?",
    "I can't find {appword} after the latest update on {appword}.",
    "Does the {product} support {appword}?",
    "Please cancel order {order}, I no longer need it.",
    "Your ticket {ticket} has been closed. Reply to reopen it.",
    "Hello Team, I paid {amount} by {pay} but the invoice shows {amount}.",
    "the app keeps crashing when i open {appword}",
    "what is the difference between {product} and {product}",
    "Your verification code is {code}. Do not share it with anyone.",
    "We are closed on {weekday} and public holidays.",
    "The {product} promotion ends in {month}.",
    "Thanks for your help, have a nice day!",
    "Is a Visa or Mastercard debit card accepted for Apple Pay?",
    "Where can I download my PDF statement? I only see Excel export.",
    "Dear Customer, your parcel {order} is out for delivery.",
    "Reset Password link does not work in Chrome or Safari.",
    "ok thanks",
    "Can I pay in {count} instalments with {pay}?",
    "The Terms of Service say refunds take {count} days.",
    "Best regards, Customer Service",
    "I changed my PIN but Face ID still asks for the old one.",
)
NEG_SHARE = 0.2
STYLE_WEIGHTS: dict[str, float] = {"ticket": 0.26, "mail": 0.24, "chat": 0.28, "form": 0.22}
_SLOT = re.compile(r"\{([a-z0-9_]+)\}")


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(len(word) - 1)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i + 1:]


def _render(pieces: list[Piece], chat: bool, rng: random.Random) -> dict[str, Any]:
    """Join the pieces, recording each entity's offsets as it is appended. In chat style
    literal text is lower-cased, typo'd and loses some punctuation, and entities are
    lower-cased half the time."""
    lower_entities = chat and rng.random() < 0.5
    text, spans = "", []
    for k, piece in enumerate(pieces):
        if isinstance(piece, str):
            lit = piece
            if chat:
                lit = " ".join(_typo(w, rng) if rng.random() < 0.04 else w
                               for w in lit.lower().split(" "))
                if k == len(pieces) - 1 and rng.random() < 0.6:
                    lit = lit.rstrip(".?!")
            text += lit
            continue
        kind, value = piece
        if lower_entities:
            value = value.lower()
        spans.append({"entity_type": kind, "entity_value": value,
                      "start_position": len(text), "end_position": len(text) + len(value)})
        text += value
    return {"full_text": text, "spans": spans}


def generate(n: int, seed: int = 0) -> list[dict]:
    """``n`` labelled rows in the synthetic set's format (``full_text``, ``spans`` with
    ``entity_type``, ``entity_value``, ``start_position``, ``end_position``; plus
    ``template_id`` and ``metadata``). The same ``(n, seed)`` gives the same rows."""
    gen = _Gen(seed)
    rng = gen.rng
    slots = _slots()
    by_style: dict[str, list[int]] = {}
    for i, (style, _) in enumerate(TEMPLATES):
        by_style.setdefault(style, []).append(i)
    styles, weights = list(STYLE_WEIGHTS), list(STYLE_WEIGHTS.values())
    rows = []
    for _ in range(n):
        row = _Row(gen)
        if rng.random() < NEG_SHARE:
            k = rng.randrange(len(NEGATIVES))
            template, style, tid = NEGATIVES[k], "neg", f"gen-neg-{k}"
        else:
            style = rng.choices(styles, weights)[0]
            k = rng.choice(by_style[style])
            template, tid = TEMPLATES[k][1], f"gen-{k}"
        pieces: list[Piece] = []
        pos = 0
        for m in _SLOT.finditer(template):
            if m.start() > pos:
                pieces.append(template[pos:m.start()])
            name = m.group(1)
            # Labelled slots are drawn once per row; fillers afresh each time.
            if name in row.cache:
                got = row.cache[name]
            else:
                got = slots[name](row)
                if any(not isinstance(p, str) for p in got) and not name.endswith(("date", "ip")):
                    row.cache[name] = got
            pieces.extend(got)
            pos = m.end()
        if pos < len(template):
            pieces.append(template[pos:])
        chat = style == "chat" or (style != "mail" and rng.random() < 0.08)
        out = _render(pieces, chat, rng)
        out["template_id"] = tid
        out["metadata"] = {"generator": "fleetlm.privacy.learned.generate", "style": style,
                           "seed": seed, "locales": sorted({p["loc"] for p in row.people.values()})}
        rows.append(out)
    return rows
