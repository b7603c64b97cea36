"""``fleetlm tune``: run every stage in order, each cached by the hash of what it depends on.

    load+prepare -> [synthesize -> filter] -> train -> evaluate -> publish

Stage outputs live in ``<run>/stages/<stage>-<key>/``; ``key`` hashes the stage's own
settings, the keys of the stages it reads (and, for the first, the bytes of the data
files). A stage whose folder is complete (its ``done.json`` written last) is skipped, so
a re-run after a crash, or after changing only ``eval:``, redoes only what changed.
Training checkpoints inside its stage folder; ``resume=True`` continues from there.

The run folder also gets ``summary.json`` (every report and metric), ``loss.png``,
``confusion.png`` (classification) and ``tune.log``. Progress goes through
:class:`fleetlm.progress.Progress`: bars on a terminal, plain lines (stage, step/total,
rate, eta) every ``FLEETLM_PROGRESS_INTERVAL`` seconds anywhere else. This module knows the
order of the stages and their caching, not how each stage does its work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fleetlm.errors import ConfigError, FleetLMError
from fleetlm.progress import Progress
from fleetlm.tune.config import TuneConfig
from fleetlm.tune.records import Example, read_jsonl, write_jsonl

log = logging.getLogger("fleetlm.tune")

STAGE_VERSION = 1  # bump when a stage's output format or meaning changes
DONE = "done.json"


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Stage:
    name: str
    key: str
    folder: Path

    @property
    def done(self) -> bool:
        return (self.folder / DONE).is_file()

    def finish(self, report: dict[str, Any]) -> None:
        tmp = self.folder / (DONE + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(self.folder / DONE)

    def report(self) -> dict[str, Any]:
        return dict(json.loads((self.folder / DONE).read_text()))


class Reporter:
    """Progress of every stage (:class:`fleetlm.progress.Progress`, label ``tune``: bars on a
    terminal, plain timestamped lines at a steady interval anywhere else) and the log; a
    no-op sink when ``quiet``. ``stream``: where bars, lines and messages go (default: stdout,
    where `fleetlm tune` has always reported; its errors go to stderr)."""

    def __init__(self, quiet: bool = False, stream: IO[str] | None = None) -> None:
        self.quiet = quiet
        self.stream = stream
        self._progress: Progress | None = None

    @contextmanager
    def live(self) -> Iterator[Reporter]:
        if self.quiet:
            yield self
            return
        with Progress("tune", stream=self._out()) as p:
            self._progress = p
            try:
                yield self
            finally:
                self._progress = None

    def say(self, msg: str) -> None:
        log.info(msg)
        if self._progress is not None:
            self._progress.say(msg)
        elif not self.quiet:
            print(msg, file=self._out(), flush=True)

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stdout

    def bar(self, description: str, total: int | None = None) -> Callable[..., None]:
        """A progress callback ``update(done, total=None, info="")`` for one stage."""
        if self._progress is None:
            return lambda done, total=None, info="": None
        return self._progress.task(description, total)


@dataclass
class TuneResult:
    run_dir: Path
    adapter_dir: Path  # the published adapter (or the full model folder)
    summary: dict[str, Any]


class Pipeline:
    def __init__(self, cfg: TuneConfig, *, resume: bool = False, quiet: bool = False,
                 serve_url: str | None = None, device: str = "cpu") -> None:
        self.cfg = cfg
        self.resume = resume
        self.serve_url = serve_url or cfg.publish.serve_url
        self.device = device
        self.run_dir = cfg.run_dir()
        self.rep = Reporter(quiet)
        self.summary: dict[str, Any] = {"name": cfg.name, "base_model": cfg.base_model,
                                        "stages": {}}

    # ---------------------------------------------------------------- helpers
    def stage(self, name: str, *parts: Any) -> Stage:
        key = _digest(name, STAGE_VERSION, *parts)
        folder = self.run_dir / "stages" / f"{name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        return Stage(name, key, folder)

    def _surface(self, stage: Stage, name: str) -> None:
        """Copy a stage's file (a plot) to the top of the run folder, if the stage made one."""
        if (stage.folder / name).is_file():
            shutil.copyfile(stage.folder / name, self.run_dir / name)

    def _record(self, stage: Stage, report: dict[str, Any], cached: bool) -> None:
        self.summary["stages"][stage.name] = {"key": stage.key, "cached": cached, **report}

    # ---------------------------------------------------------------- stages
    def prepare(self) -> tuple[Stage, list[Example], list[Example]]:
        from fleetlm.tune.load import load_rows
        from fleetlm.tune.prepare import prepare

        c = self.cfg
        files = c.data.paths + c.data.validation_paths
        for f in files:
            if not Path(f).is_file():
                field = "data.path" if f in c.data.paths else "data.validation_path"
                raise ConfigError(f"{field}: {f} does not exist; relative paths are taken from "
                                  "the folder of the tune config")
        st = self.stage("prepare", c.task, c.data, c.prepare, c.seed,
                        [file_digest(Path(f)) for f in files])
        if st.done:
            self.rep.say(f"prepare: cached ({st.folder.name})")
            self._record(st, st.report(), True)
            return st, read_jsonl(st.folder / "train.jsonl"), read_jsonl(st.folder / "val.jsonl")
        t0 = time.perf_counter()
        train, val = load_rows(c)
        bar = self.rep.bar("prepare")
        res = prepare(train, val, c, progress=lambda _s, d, t: bar(d, t))
        write_jsonl(st.folder / "train.jsonl", res.train)
        write_jsonl(st.folder / "val.jsonl", res.val)
        report = {**res.report, "seconds": time.perf_counter() - t0}
        st.finish(report)
        self._record(st, report, False)
        self.rep.say(f"prepare: {report.get('rows_in')} rows in -> {len(res.train)} train, "
                     f"{len(res.val)} validation ({report['seconds']:.1f} s)")
        return st, res.train, res.val

    def synthesize(self, prev: Stage, train: list[Example], val: list[Example]
                   ) -> tuple[Stage, list[Example]]:
        """Teacher rows that passed the filter, appended to ``train`` (a new data stage)."""
        from fleetlm.tune.filter import filter_synthetic
        from fleetlm.tune.synthesize import synthesize

        c = self.cfg
        teacher = c.synthesize.teacher.model_dump(exclude={"api_key_env"}) \
            if c.synthesize.teacher else None
        st = self.stage("synthesize", prev.key, c.synthesize.model_dump(exclude={"teacher"}),
                        teacher, c.task, c.seed)
        cached = st.done
        if not cached:
            bar = self.rep.bar("synthesize")
            res = asyncio.run(synthesize(train, c, progress=lambda _s, d, t: bar(d, t)))
            write_jsonl(st.folder / "synthetic.jsonl", res.rows)
            st.finish(res.report)
        synthetic = read_jsonl(st.folder / "synthetic.jsonl")
        self._record(st, st.report(), cached)
        ft = self.stage("filter", st.key, c.filter, c.prepare.anonymize, prev.key)
        cached = ft.done
        if not cached:
            bar = self.rep.bar("filter")
            fres = asyncio.run(filter_synthetic(synthetic, train + val, c,
                                                progress=lambda _s, d, t: bar(d, t)))
            write_jsonl(ft.folder / "train.jsonl", train + fres.kept)
            ft.finish({**fres.report, "kept": len(fres.kept), "synthetic_in": len(synthetic)})
        rep = ft.report()
        self._record(ft, rep, cached)
        self.rep.say(f"synthesize: {len(synthetic)} teacher rows, {rep['kept']} kept by the filter")
        return ft, read_jsonl(ft.folder / "train.jsonl")

    def labels(self, train: list[Example]) -> list[str] | None:
        if self.cfg.task.type != "classification":
            return None
        if self.cfg.task.labels is not None:
            return list(self.cfg.task.labels)
        return sorted({ex.label for ex in train if ex.label is not None})

    def train(self, data: Stage, train: list[Example], val: list[Example]) -> tuple[Stage, Path]:
        import torch

        from fleetlm.models.loader import load_tokenizer, resolve_source
        from fleetlm.tune.format import encode
        from fleetlm.tune.train import build_model
        from fleetlm.tune.train import train as run_training

        c = self.cfg
        base = resolve_source(c.base_model)
        st = self.stage("train", data.key, c.task, c.train, str(base.resolve()))
        if st.done:
            self.rep.say(f"train: cached ({st.folder.name})")
            self._record(st, st.report(), True)
            return st, st.folder / "adapter"
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        tok = load_tokenizer(base)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        enc_train, too_long = [], 0
        for ex in train:
            e = encode(tok, ex, c.task)
            if len(e.input_ids) > c.train.max_seq_len:
                too_long += 1
                continue
            enc_train.append(e)
        enc_val = [e for e in (encode(tok, ex, c.task) for ex in val)
                   if len(e.input_ids) <= c.train.max_seq_len]
        if too_long:
            self.rep.say(f"train: {too_long} rows longer than train.max_seq_len="
                         f"{c.train.max_seq_len} tokens skipped")
        model = build_model(base, c.train)
        bar = self.rep.bar("train")

        def on_step(e: dict[str, Any]) -> None:
            if "loss" in e:
                bar(e["step"], e["total"], f"loss {e['loss']:.3f}  {e['tokens_per_s']:.0f} tok/s")
            else:
                mark = f" (best {e['metric']} so far)" if e.get("best") else ""
                self.rep.say(f"  step {e['step']}: validation loss {e['val_loss']:.4f}, "
                             f"greedy accuracy {e['val_accuracy']:.3f}{mark}")

        resume = self.resume and (st.folder / "checkpoint").is_dir()
        if resume:
            self.rep.say("train: resuming from the last checkpoint")
        res = run_training(model, enc_train, enc_val, c.train, st.folder, pad_id=pad, tokenizer=tok,
                    resume=resume, device=self.device,
                    classification=c.task.type == "classification", on_step=on_step)
        from fleetlm.tune.evaluate import loss_png

        loss_png(res.history, st.folder / "loss.png")
        report = {"steps": res.steps, "train_rows": len(enc_train), "skipped_too_long": too_long,
                  "train_tokens": res.train_tokens, "train_seconds": res.train_seconds,
                  "tokens_per_s": res.tokens_per_s, "best_val_loss": res.best_val_loss,
                  "best_val_accuracy": res.best_val_accuracy, "best_step": res.best_step,
                  "early_stopping_metric": res.metric, "stopped_early": res.stopped_early,
                  "final_train_loss": next((h["loss"] for h in reversed(res.history)
                                            if "loss" in h), None),
                  "first_train_loss": next((h["loss"] for h in res.history if "loss" in h), None)}
        st.finish(report)
        self._record(st, report, False)
        kept = ("" if res.best_step is None else
                f"; kept step {res.best_step} by {res.metric}: validation loss "
                f"{res.best_val_loss:.4f}, greedy accuracy {res.best_val_accuracy:.3f}")
        self.rep.say(f"train: {res.steps} steps, {res.tokens_per_s:.0f} tokens/s"
                     f"{' (stopped early)' if res.stopped_early else ''}{kept}")
        return st, res.output_dir

    def evaluate(self, trained: Stage, output: Path, train: list[Example], val: list[Example],
                 labels: list[str] | None) -> tuple[Stage, dict[str, Any]]:
        import random

        from fleetlm.tune.evaluate import confusion_png, evaluate, pick_shots

        c = self.cfg
        st = self.stage("evaluate", trained.key, c.eval, c.task, c.seed)
        if st.done:
            self.rep.say(f"evaluate: cached ({st.folder.name})")
            rep = st.report()
            self._record(st, rep, True)
            return st, rep
        rng = random.Random(c.seed)
        rows = list(val)
        if c.eval.max_rows is not None and len(rows) > c.eval.max_rows:
            rows = rng.sample(rows, c.eval.max_rows)
        base_rows = rows if c.eval.base_rows is None else rows[: c.eval.base_rows]
        results = {}
        with self._engine(output) as (engine, adapter):
            def run(name: str, rws: list[Example], adapter_name: str | None,
                    list_labels: bool, shots: list[Example]) -> Any:
                bar = self.rep.bar(f"evaluate {name}")
                r = evaluate(engine, rws, c.task, labels, adapter=adapter_name, name=name,
                             list_labels=list_labels, shots=shots,
                             max_new_tokens=c.eval.max_new_tokens,
                             progress=lambda d, t: bar(d, t))
                self.rep.say(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items())
                             + f" on {r.rows} rows")
                return r

            tuned = run("tuned", rows, adapter, False, [])
            results["tuned"] = tuned
            if c.eval.base_rows != 0:
                cls = c.task.type == "classification"
                results["base_zero_shot"] = run("base zero-shot", base_rows, None, cls, [])
                if c.eval.few_shot:
                    shots = pick_shots(train, c.eval.few_shot, c.seed)
                    results["base_few_shot"] = run(f"base few-shot (k={len(shots)})", base_rows,
                                                   None, cls, shots)
        with (st.folder / "predictions.jsonl").open("w") as f:
            for ex, p in zip(rows, tuned.predictions, strict=True):
                f.write(json.dumps({"text": ex.text, "prompt": ex.prompt, "reference": ex.answer,
                                    "prediction": p}, ensure_ascii=False) + "\n")
        report = {k: {"rows": r.rows, **r.metrics} for k, r in results.items()}
        if labels is not None:
            confusion_png(tuned, labels, st.folder / "confusion.png")
        st.finish(report)
        self._record(st, report, False)
        return st, report

    @contextmanager
    def _engine(self, output: Path) -> Iterator[tuple[Any, str | None]]:
        """An engine over the base with the new adapter in a store (lora), or over the
        tuned model itself (full)."""
        from fleetlm.adapters import AdapterStore
        from fleetlm.engine.engine import Engine, EngineConfig
        from fleetlm.models.loader import load_model

        c = self.cfg
        full = c.train.method == "full"
        lm = load_model(str(output) if full else c.base_model, dtype="auto")
        rank = max(16, c.train.rank)
        store = None if full else AdapterStore(output.parent, lm.config, dtype=lm.model.dtype,
                                               max_rank=rank)
        from fleetlm.models.kv_cache import max_kv_len

        max_len = max_kv_len(lm.model, 4096)  # the rotary table bounds the KV rows
        engine = Engine(lm, EngineConfig(max_running=32, max_len=max_len,
                                         max_hot_adapters=0 if full else 1,
                                         max_lora_rank=rank, max_step_tokens=2048,
                                         prefill_chunk=2048), store=store)
        try:
            yield engine, None if full else output.name
        finally:
            engine.shutdown(10)

    def publish(self, output: Path, labels: list[str] | None, metrics: dict[str, Any]) -> Path:
        from fleetlm.tune.card import model_card
        from fleetlm.tune.format import TASK_FILE, task_card

        c = self.cfg
        (output / TASK_FILE).write_text(json.dumps(task_card(c.task, labels), indent=1))
        (output / "README.md").write_text(model_card(c, self.summary, labels, metrics))
        if c.train.method == "full":
            dest = self.run_dir / "model"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(output, dest)
            self.rep.say(f"publish: full model in {dest} (serve it with "
                         f"`fleetlm serve --model {dest}`)")
            return dest
        from fleetlm.adapters import AdapterStore
        from fleetlm.models.loader import read_config, resolve_source
        from fleetlm.paths import default_adapters_dir

        root = c.publish.adapters_dir or default_adapters_dir()
        root.mkdir(parents=True, exist_ok=True)
        store = AdapterStore(root, read_config(resolve_source(c.base_model)),
                             max_rank=max(64, c.train.rank))
        info = store.add(output, c.name, overwrite=c.publish.overwrite)
        self.rep.say(f"publish: adapter {info.name!r} in {root}")
        if self.serve_url:
            self._upload(root / c.name)
        return root / c.name

    def _upload(self, folder: Path) -> None:
        """Load the adapter into a running server (POST /v1/adapters, multipart)."""
        import httpx

        base = self.serve_url.rstrip("/") if self.serve_url else ""
        base = base[:-3] if base.endswith("/v1") else base
        files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())
                 if p.is_file() and p.suffix in (".json", ".safetensors")]
        # the local store already applied publish.overwrite; the server mirrors it
        data = {"name": self.cfg.name, "overwrite": "true"}
        try:
            r = httpx.post(f"{base}/v1/adapters", data=data, files=files, timeout=120)
        except httpx.HTTPError as e:
            raise FleetLMError(f"publish.serve_url: could not reach {base} ({e}); the adapter "
                               f"is in {folder}; load it later with `curl -X POST "
                               f"{base}/v1/adapters -F name={self.cfg.name} -F files=@...`") from e
        if r.status_code != 201:
            raise FleetLMError(f"publish.serve_url: {base} refused the adapter "
                               f"(HTTP {r.status_code}: {r.text[:300]})")
        self.rep.say(f"publish: loaded into {base} as model {self.cfg.name!r}")

    # ---------------------------------------------------------------- the run
    def run(self) -> TuneResult:
        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / "tune.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        (self.run_dir / "config.json").write_text(c.model_dump_json(indent=1))
        t0 = time.perf_counter()
        try:
            with self.rep.live():
                data, train, val = self.prepare()
                if c.synthesize.enabled:
                    data, train = self.synthesize(data, train, val)
                labels = self.labels(train)
                trained, output = self.train(data, train, val)
                self._surface(trained, "loss.png")
                metrics: dict[str, Any] = {}
                if c.eval.enabled:
                    evaluated, metrics = self.evaluate(trained, output, train, val, labels)
                    self._surface(evaluated, "confusion.png")
                published = self.publish(output, labels, metrics)
        finally:
            log.removeHandler(handler)
            handler.close()
        self.summary.update(metrics=metrics, published=str(published),
                            wall_seconds=time.perf_counter() - t0)
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str))
        return TuneResult(self.run_dir, published, self.summary)
