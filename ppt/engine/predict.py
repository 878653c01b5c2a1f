"""Predict users' own clouds with a trained experiment: load once, predict many, chunk huge ones.

    from ppt import Predictor
    predictor = Predictor("exp/demo")                  # config.yaml + model/model_best.pth
    pred = predictor.predict("scan.ply")               # or an (N, 3|6|9) array, or a Cloud
    pred.labels, pred.confidence, pred.class_names     # one label per input row (-1 = dropped)

Per scene the forward and the test-time voting are ``ppt.engine.evaluate.predict_scene``, the
path ``tools/test.py`` evaluates with. A cloud whose voxels (at the model's voxel size) fit
``max_points`` runs in one pass. A larger one is cut into xy tiles (``xy_tiles``): each tile's
core is grown by ``overlap`` metres of context on every side, the grown tile is predicted on
its own, and the per-point probabilities of all tiles that contain a point are averaged with
weight 1 inside the tile's core, falling linearly towards 0 across the margin, so that a
point is decided mostly by the tile that sees it with the most context around it. Memory is
then that of one tile plus the (N, K) float32 vote sums of the whole cloud.

Label set: ``classes`` (language head: embedded with the experiment's text encoder); else the
prompt's dataset; else, with the ``"mean"`` prompt of unknown data, every class of the trained
datasets merged by name (language and union heads; embeddings taken from the checkpoint) or the
first trained dataset's classes (decoupled head, which has no shared label set).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ppt.data.clouds import Cloud, CloudError, make_cloud, read_cloud
from ppt.engine.evaluate import MAX_POINTS, predict_scene, tta_protocol

OPEN_VOCAB = "open_vocab"          # label-set name of ``classes`` inside the model
UNION = "union"                    # label-set name of the merged classes (prompt "mean")
OVERLAP_VOXELS = 32                # default tile margin, in voxels (0.64 m at 2 cm)
_MIN_WEIGHT = 1e-3                 # weight of a point at the very edge of a tile's margin


class ExperimentError(ValueError):
    """An experiment that cannot be loaded or asked for what it cannot do (one-line message)."""


def load_experiment(exp: str | os.PathLike | None, weights: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu"):
    """(config, model in eval mode on ``device``, checkpoint path) of a trained experiment.

    ``exp`` holds ``config.yaml`` and ``model/model_best.pth`` (``model_last.pth`` when training
    has not validated yet); ``weights`` picks another checkpoint. With ``weights`` alone the
    config stored inside the checkpoint is used. A LoRA run's updates are merged into the base
    weights (``ppt.models.peft.lora.merge_lora``). Raises :class:`ExperimentError`.
    """
    from ppt.config import ConfigError, config_from_dict, load_config
    from ppt.engine.build import build_model, text_embeddings_from_state
    from ppt.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state

    exp = Path(exp) if exp else None
    if exp is None and not weights:
        raise ExperimentError("give an experiment folder (exp/<name>) or a weights file")
    if exp is not None:
        if not exp.is_dir():
            raise ExperimentError(f"experiment folder {exp} does not exist")
        if not (exp / "config.yaml").is_file():
            raise ExperimentError(f"{exp / 'config.yaml'} is missing: is {exp} an experiment folder "
                                  f"written by tools/train.py?")
    if weights:
        ckpt_path = Path(weights)
    else:
        ckpt_path = exp / "model" / "model_best.pth"
        if not ckpt_path.is_file() and (exp / "model" / "model_last.pth").is_file():
            ckpt_path = exp / "model" / "model_last.pth"  # not validated yet: the latest weights
    if not ckpt_path.is_file():
        raise ExperimentError(f"checkpoint {ckpt_path} does not exist")
    try:
        ckpt = load_checkpoint(ckpt_path)
        if exp is not None:
            cfg = load_config(exp / "config.yaml")
        elif isinstance(ckpt.get("config"), dict):
            cfg = config_from_dict(ckpt["config"], f" (config stored in {ckpt_path})")
        else:
            raise ExperimentError(f"{ckpt_path} stores no config: pass the experiment folder too")
        state = ckpt.get("model", ckpt)
        # The class embeddings travel in the checkpoint: no text encoder needed here.
        model = build_model(cfg, text_embeddings_from_state(state))
        if cfg.peft.stage != "none":  # PEFT run: base weights + stage, then its trainable part
            from ppt.engine.peft_checkpoint import prepare_peft_model

            prepare_peft_model(model, cfg, exp or ckpt_path.parent, ckpt=ckpt)
        load_model_state(model, state, ckpt_path)
        if cfg.peft.stage == "lora":  # inference and export: the updates folded into the base weights
            from ppt.models.peft.lora import merge_lora

            merge_lora(model)
    except (ConfigError, CheckpointError) as err:
        raise ExperimentError(str(err)) from None
    return cfg, model.to(device).eval(), ckpt_path


@dataclass
class Prediction:
    """Labels of one cloud.

    Attributes:
        labels: int64 (N_in,) class index per INPUT row; -1 for rows dropped (NaN/inf).
        confidence: float32 (N_in,) averaged probability of the predicted class (0 if dropped).
        class_names: names of the label indices.
        chunks: model passes (1 = whole cloud at once).
        seconds: prediction time (normals, forwards, merging; not file reading).
        notes: remarks (dropped rows, colour scale, estimated normals ...).
    """

    labels: np.ndarray
    confidence: np.ndarray
    class_names: tuple[str, ...]
    chunks: int = 1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def histogram(self) -> dict[str, int]:
        """{class name: points}, classes with points only, most frequent first."""
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[i]: int(counts[i]) for i in order if counts[i]}


def xy_tiles(coord: np.ndarray, voxel_size: float, max_voxels: int, margin: int,
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a cloud's occupied voxels into xy tiles of at most ``max_voxels`` (margin included).

    Tiles are boxes in integer voxel columns (x, y): a core ``[lo, hi)`` per tile, the cores
    partitioning the plane, so every point lies in exactly one core. A box whose core grown by
    ``margin`` columns holds more than ``max_voxels`` occupied voxels is split at the median of
    its voxels along its longer side; a box is not split below ``2 * margin`` columns (the
    margins would dominate), so a very dense column can exceed the budget.

    Args:
        coord: float (N, 3) points.
        voxel_size: voxel edge in metres.
        max_voxels: budget of occupied voxels per grown tile.
        margin: overlap in voxel columns.

    Returns:
        [(lo int64 (2,), hi int64 (2,))] cores in voxel-column coordinates
        ``floor(coord[:, :2] / voxel_size)``.
    """
    from ppt.data.grid import voxelize

    # One row per occupied voxel: tiles are sized by what the network sees, not by raw points.
    grid, key = voxelize(coord, voxel_size)
    _, first = np.unique(key, return_index=True)
    corner = np.floor(np.asarray(coord[:, :2], np.float64) / voxel_size).astype(np.int64).min(0)
    cells = grid[first, :2].astype(np.int64) + corner
    del grid, key
    tiles: list[tuple[np.ndarray, np.ndarray]] = []
    stack = [(cells.min(0), cells.max(0) + 1)]
    while stack:
        lo, hi = stack.pop()
        inside = ((cells >= lo - margin) & (cells < hi + margin)).all(1)
        size = hi - lo
        axis = int(np.argmax(size))
        if inside.sum() <= max_voxels or size[axis] <= 2 * margin:
            tiles.append((lo, hi))
            continue
        core = cells[((cells >= lo) & (cells < hi)).all(1), axis]
        cut = int(np.median(core)) if len(core) else int(lo[axis] + size[axis] // 2)
        cut = min(max(cut, lo[axis] + 1), hi[axis] - 1)  # both halves non-empty boxes
        left_hi, right_lo = hi.copy(), lo.copy()
        left_hi[axis], right_lo[axis] = cut, cut
        stack += [(right_lo, hi), (lo, left_hi)]
    return tiles


def predict_chunked(scene: dict, score: Callable[[dict], torch.Tensor], voxel_size: float,
                    max_points: int, overlap: float,
                    log: Callable[[str], None] | None = None) -> tuple[np.ndarray, int]:
    """Per-point class probabilities of a raw scene, whole or in overlapping xy tiles.

    Args:
        scene: ``coord`` f32 (N, 3), ``color`` (N, 3) 0..255, ``normal`` f32 (N, 3).
        score: one pass over a (sub-)scene dict -> scores (n, K), any positive scale per row
            (``predict_scene``: a softmax or a sum of softmaxes).
        voxel_size: voxel edge in metres (sizes the tiles).
        max_points: most occupied voxels per pass (margin included).
        overlap: context margin around each tile's core, in metres.
        log: progress sink, one line per tile.

    Returns:
        (float32 (N, K) probabilities: rows sum to 1; number of passes).
    """
    coord = scene["coord"]
    margin = max(1, int(np.ceil(overlap / voxel_size)))
    tiles = xy_tiles(coord, voxel_size, max_points, margin)
    if len(tiles) == 1:
        scores = score(scene).numpy()
        return scores / np.maximum(scores.sum(1, keepdims=True), 1e-12), 1
    cell = np.floor(coord[:, :2].astype(np.float64) / voxel_size).astype(np.int64)
    total: np.ndarray | None = None
    for t, (lo, hi) in enumerate(tiles):
        # Columns outside the core, per axis (0 inside): the margin position of each point.
        outside = np.maximum(np.maximum(lo - cell, cell - (hi - 1)), 0).max(1)
        ids = np.flatnonzero(outside <= margin)
        if len(ids) == 0:
            continue
        part = score({k: v[ids] for k, v in scene.items() if isinstance(v, np.ndarray) and len(v) == len(coord)})
        part = part.numpy()
        part /= np.maximum(part.sum(1, keepdims=True), 1e-12)
        weight = np.maximum(1.0 - outside[ids] / (margin + 1.0), _MIN_WEIGHT).astype(np.float32)
        if total is None:
            total = np.zeros((len(coord), part.shape[1]), np.float32)
        total[ids] += weight[:, None] * part
        if log is not None:
            log(f"tile {t + 1}/{len(tiles)}: {len(ids)} points")
    total /= total.sum(1, keepdims=True)  # every point is in one core (weight 1): no zero rows
    return total, len(tiles)


class Predictor:
    """A trained experiment loaded once, predicting any number of clouds.

    Args:
        exp: experiment folder (``config.yaml`` + ``model/model_best.pth`` or ``model_last.pth``).
        weights: checkpoint to use instead (alone: the config stored in it).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        prompt: a trained dataset's name, or "mean" for data from an unknown domain.
        classes: class names to predict (language head only), e.g. ["wall", "floor", "chair"].
        voxel_size: grid size in metres; default the training value.
        tta: "off", "fast" (13 views), "fragments" (13 views x covering fragments), or a bool.
        max_points: most voxels per model pass; larger clouds are cut into tiles.
        overlap: tile margin in metres; default ``OVERLAP_VOXELS`` voxels.
        log: progress sink (e.g. ``print``); None = quiet.
        threads: torch CPU threads of each prediction on a CPU: 0 (default) = one per core that
            other work leaves free, chosen once here as training and tools/test.py choose
            (OpenMP threads on a core another job keeps busy stall every layer); N > 0 = N;
            None = the process's own setting. The caller's thread count is restored after each
            call (``threads_note`` says what was chosen and why).
    """

    def __init__(self, exp: str | os.PathLike | None = None, *, weights: str | os.PathLike | None = None,
                 device: str = "auto", prompt: str = "mean", classes: Sequence[str] | None = None,
                 voxel_size: float | None = None, tta: str | bool = "off", max_points: int = MAX_POINTS,
                 overlap: float | None = None, log: Callable[[str], None] | None = None,
                 threads: int | None = 0):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ExperimentError("device cuda asked for but CUDA is not available")
        self.device = torch.device(device)
        self.cfg, self.model, self.weights = load_experiment(exp, weights, self.device)
        self.voxel_size = float(voxel_size or self.cfg.data.voxel_size)
        if self.voxel_size <= 0:
            raise ExperimentError(f"voxel size must be > 0, got {self.voxel_size}")
        if max_points < 1:
            raise ExperimentError(f"max_points must be >= 1, got {max_points}")
        try:
            self.tta = tta_protocol(tta)
        except ValueError as err:
            raise ExperimentError(str(err)) from None
        self.max_points, self.log = int(max_points), log
        self.overlap = float(overlap) if overlap is not None else OVERLAP_VOXELS * self.voxel_size
        self.trained = tuple(self.cfg.data.mix)
        if prompt != "mean" and prompt not in self.trained:
            raise ExperimentError(f"unknown prompt {prompt!r}; valid: {', '.join(self.trained)}, mean")
        self.prompt = prompt
        self.label_space, self.class_names, self.label_note = self._label_set(classes)
        self.threads, self.threads_note = None, "threads: the process's own"
        if threads is not None and self.device.type == "cpu":
            from ppt.engine.threads import choose_threads

            if threads < 0:
                raise ExperimentError(f"threads must be >= 0 or None, got {threads}")
            self.threads, why = choose_threads(threads)
            self.threads_note = why.replace("train.threads", "threads")
        cuda = self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None

    def _label_set(self, classes: Sequence[str] | None) -> tuple[str, tuple[str, ...], str]:
        """(label space name in the model, its class names, a note for the user)."""
        from ppt.data.classes import union_label_space

        head = self.cfg.model.head
        if classes is not None:
            names = tuple(n.strip() for n in classes if n.strip())
            if not names:
                raise ExperimentError("the class list is empty")
            if len({n.lower() for n in names}) != len(names):
                raise ExperimentError(f"the class list names a class twice: {', '.join(names)}")
            if head != "language":
                raise ExperimentError(f"choosing classes needs the language head; this model's head is {head!r}")
            from ppt.text import TextEncoderUnavailable, class_embeddings

            try:
                emb = class_embeddings(list(names), self.cfg.model.text_encoder, self.cfg.model.template)
            except TextEncoderUnavailable as err:
                raise ExperimentError(str(err)) from None
            self.model.set_label_space(OPEN_VOCAB, names, emb.to(self.device))
            return OPEN_VOCAB, names, f"{len(names)} classes given"
        if self.prompt != "mean":
            return self.prompt, self.cfg.dataset_info(self.prompt).class_names, f"{self.prompt}'s classes"
        lists = {d: self.cfg.dataset_info(d).class_names for d in self.trained}
        if head == "decoupled":
            first = self.trained[0]
            return first, lists[first], (f"{first}'s classes (a decoupled head has no shared label set; "
                                         f"a prompt NAME picks another dataset's)")
        names, index = union_label_space(lists)
        emb = None
        if head == "language":  # the union's embeddings are rows of the stored ones: no encoder
            emb = torch.zeros(len(names), self.model.head.embed_dim, device=self.device)
            for d, rows in index.items():
                emb[rows] = self.model.head.embeddings(d)
        self.model.set_label_space(UNION, names, emb)
        return UNION, names, f"the {len(names)} classes of {', '.join(self.trained)} merged by name"

    def _score(self, scene: dict) -> torch.Tensor:
        return predict_scene(self.model, scene, voxel_size=self.voxel_size, label_space=self.label_space,
                             prompt=self.prompt, tta=self.tta, device=self.device,
                             amp_dtype=self.amp_dtype, max_points=self.max_points,
                             features=tuple(self.cfg.data.features))

    def predict(self, points, color: np.ndarray | None = None, normal: np.ndarray | None = None) -> Prediction:
        """Labels for one cloud.

        Args:
            points: a file path, a :class:`~ppt.data.clouds.Cloud`, or an array (N, 3), (N, 6)
                or (N, 9): x y z [r g b [nx ny nz]].
            color: (N, 3) colour (any scale) when ``points`` is an (N, 3) array.
            normal: (N, 3) normals when ``points`` is an array without them.
        """
        if isinstance(points, (str, os.PathLike)):
            cloud = read_cloud(points)
        elif isinstance(points, Cloud):
            cloud = points
        else:
            array = np.asarray(points)
            if array.ndim != 2 or array.shape[1] not in (3, 6, 9):
                raise ValueError(f"points must be (N, 3), (N, 6) or (N, 9), got {array.shape}")
            color = array[:, 3:6] if array.shape[1] >= 6 else color
            normal = array[:, 6:9] if array.shape[1] == 9 else normal
            cloud = make_cloud(array[:, :3], color, normal)
        return self.predict_cloud(cloud)

    def _missing_colour(self, cloud: Cloud, notes: list[str]) -> np.ndarray:
        """float32 (N, 3) colour for a cloud without any: the value training's colour dropout
        set (``RandomColorDrop``) when the model was trained with it. Otherwise raises
        :class:`CloudError`: a colour-trained model's labels on such a cloud are not usable (a
        tester's colourless PLY came out 60.7 % chair and 24.8 % door, with no wall)."""
        from ppt.data.transforms import DROPPED_COLOR

        p = self.cfg.data.color_drop
        colourless = [d for d in self.trained if not self.cfg.dataset_info(d).has_color]
        if colourless:  # trained on a dataset without colour (dataset.yaml color: false): zeros as there
            notes.append(f"no colour: filled with {DROPPED_COLOR:g} (black), as in the colourless training "
                         f"data of {', '.join(colourless)}")
            return np.full((len(cloud), 3), DROPPED_COLOR, np.float32)
        if p <= 0:
            where = cloud.path if cloud.path is not None else "points"
            raise CloudError(f"{where}: the cloud has no colour and this model was trained on coloured "
                             f"points only (data.color_drop=0), so its labels would not be usable; give "
                             f"the points colour (x y z r g b), or label it with a model trained with "
                             f"colour dropout (tools/train.py ... data.color_drop=0.2)")
        notes.append(f"no colour: filled with {DROPPED_COLOR:g} (black) as training dropped it in "
                     f"{100 * p:g} % of the samples (data.color_drop={p:g}); labels from geometry alone")
        return np.full((len(cloud), 3), DROPPED_COLOR, np.float32)

    def predict_cloud(self, cloud: Cloud) -> Prediction:
        """Labels for a cloud already read (see ``predict``). A cloud without colour raises
        :class:`~ppt.data.clouds.CloudError` unless the model was trained with colour dropout."""
        if self.threads is None:
            return self._predict_cloud(cloud)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._predict_cloud(cloud)
        finally:
            torch.set_num_threads(before)

    def _predict_cloud(self, cloud: Cloud) -> Prediction:
        from ppt.data.normals import estimate_normals

        tic = time.perf_counter()
        notes = list(cloud.notes)
        # float32 relative to the cloud's corner: georeferenced coordinates (1e5..1e6 m) keep
        # millimetres, which float32 of the raw values would not.
        coord = (cloud.coord - cloud.coord.min(0)).astype(np.float32)
        color = cloud.color if cloud.color is not None else self._missing_colour(cloud, notes)
        normal = cloud.normal
        if normal is None:
            if self.log is not None:
                self.log(f"estimating normals of {len(coord)} points")
            normal = estimate_normals(coord)
            notes.append("no normals: estimated (k-NN PCA)")
        scene = {"coord": coord, "color": np.asarray(color, np.float32), "normal": np.asarray(normal, np.float32)}
        probs, chunks = predict_chunked(scene, self._score, self.voxel_size, self.max_points, self.overlap,
                                        self.log)
        labels = np.full(cloud.num_input, -1, np.int64)
        confidence = np.zeros(cloud.num_input, np.float32)
        labels[cloud.valid] = probs.argmax(1)
        confidence[cloud.valid] = probs.max(1)
        return Prediction(labels, confidence, self.class_names, chunks, time.perf_counter() - tic, notes)


def predict(points, exp: str | os.PathLike | None = None, **kwargs) -> Prediction:
    """One cloud's labels with experiment ``exp`` (see :class:`Predictor` for ``kwargs``).

    Loads the model on every call: for several clouds build one ``Predictor``.
    """
    return Predictor(exp, **kwargs).predict(points)
