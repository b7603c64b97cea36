"""Scores for the prompts of an outcomes file, as the offline commands (``fleetlm route
train|calibrate|eval``) need them: embedded in chunks behind a progress display, scored by a
trained router (saying so when the file is the one it was trained on), or read as recorded
in the file.

This module knows embedders, trained routers and outcomes files; it knows nothing of the
command line, thresholds or how a report is printed. Warnings go to the ``warn`` callback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetlm.errors import ConfigError

if TYPE_CHECKING:
    from fleetlm.router.classifier import TrainedRouter

# more prompts than this are embedded in chunks, with progress lines (or a bar on a terminal)
EMBED_CHUNK = 512


def embed_prompts(embedder: Any, prompts: list[str], label: str = "route") -> Any:
    """(n, dim) embeddings; progress on stderr (``label``: the command) when the prompts fill
    several chunks."""
    import numpy as np

    from fleetlm.progress import Progress

    chunk = EMBED_CHUNK
    if len(prompts) <= chunk:
        return embedder.embed(prompts)
    parts = []
    with Progress(label) as p:
        update = p.task(f"embedding ({embedder.model_id})", len(prompts))
        done = 0
        for i in range(0, len(prompts), chunk):
            parts.append(embedder.embed(prompts[i:i + chunk]))
            done += len(parts[-1])
            update(done)
    return np.concatenate(parts)


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def trained_router_scores(folder: Path, data: Path, prompts: list[str], *,
                          warn: Callable[[str], None], label: str = "route"
                          ) -> tuple[TrainedRouter, Any]:
    """(router, its scores for ``prompts``); warns when ``data`` is the file it was trained on."""
    from fleetlm.router.classifier import TrainedRouter, load_embedder

    try:
        router = TrainedRouter.load(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--router {folder}: {e}") from None
    router.embedder = load_embedder(router.embedding_model)
    if router.meta.get("data_sha256") == sha256_file(data):
        warn(f"warning: {folder} was trained on {data}: the figures below are in-sample "
             "(optimistic); use prompts it has not seen")
    return router, router.scores_from_embeddings(embed_prompts(router.embedder, prompts, label))


def recorded_scores(data: Path, key: str) -> Any:
    """The ``key`` number of every row of ``data`` (scores a policy recorded)."""
    from fleetlm.router.calibrate import load_scores

    try:
        return load_scores(data, key)
    except ValueError as e:
        raise ConfigError(f"{e}; give every row a {key!r} number in [0, 1], name the field "
                          "with --scores-key, or score the prompts with --router FOLDER") from None
