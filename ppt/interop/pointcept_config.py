"""Read Pointcept config files (Python) without running them.

Pointcept's ``Config.fromfile`` imports a config as a Python module. A config handed to
``tools/convert.py`` may come from anywhere, so here it is parsed with :mod:`ast` and only a
small, side-effect-free subset is evaluated, the subset the reference's own configs use:

* statements: assignments to names (also tuple unpacking, ``x[k] = v`` into a dict or list,
  ``x += v``), ``del name``, a bare string (docstring);
* expressions: literals (numbers, strings, ``None``/``True``/``False``, lists, tuples, dicts,
  sets), names bound earlier in the same file, subscripts and slices, arithmetic, unary and
  boolean operators, comparisons, ``a if c else b``, f-strings, list / set / dict
  comprehensions and generator expressions, ``"...".format(...)`` on a string;
* calls of :data:`SAFE_CALLS` only (``dict``, ``list``, ``tuple``, ``range``, ``len``, ``sum``,
  ...);
* ``from <module> import <name>`` of the reference's constant tables listed in
  :data:`KNOWN_IMPORTS` (the ScanNet200 configs import ``CLASS_LABELS_200``), resolved to this
  project's copies of the same data; nothing is imported.

Anything else (another import, attribute access, another call, ``lambda``, ``for`` / ``if``
statements, a format field such as ``{0.__class__}``) raises :class:`PointceptConfigError`
naming the file, the line and the construct. Guards against runaway values: exponents above
1000 and sequences repeated into more than a million items are refused.

``_base_`` (a path or list of paths, relative to the config's folder) is loaded first and the
config merged into it as Pointcept's ``Config._merge_a_into_b`` does: dicts merge key by key
(recursively), anything else replaces, and a dict holding ``_delete_=True`` replaces the base's
dict instead of merging into it; the same key in two bases of one file is an error. A missing
base file is named in the error together with the config that asks for it. The
``{{_base_.x}}`` text placeholders of mmcv configs are not supported (no released config of
the reference uses them).
"""
from __future__ import annotations

import ast
import operator
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppt.data.classes import SCANNET20, SCANNET20_NYU40
from ppt.data import scannet200
from ppt.interop import ConversionError

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
MAX_EXPONENT = 1000
MAX_REPEAT = 1_000_000
MAX_BASE_DEPTH = 16

SAFE_CALLS = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "range": range, "len": len, "sum": sum,
    "min": min, "max": max, "abs": abs, "round": round, "int": int, "float": float, "str": str,
    "bool": bool, "sorted": sorted, "reversed": reversed, "zip": zip, "enumerate": enumerate,
    "any": any, "all": all,
}
BIN_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
# Modules a reference config may import names from -> {name: this project's value}.
SCANNET200_CONSTANTS = "pointcept.datasets.preprocessing.scannet.meta_data.scannet200_constants"
KNOWN_IMPORTS = {
    SCANNET200_CONSTANTS: {
        "CLASS_LABELS_200": scannet200.CLASS_LABELS_200, "VALID_CLASS_IDS_200": scannet200.VALID_CLASS_IDS_200,
        "CLASS_LABELS_20": SCANNET20, "VALID_CLASS_IDS_20": SCANNET20_NYU40,
    },
    "pointcept.datasets.preprocessing.scannet.meta_data.scannet200_splits": {
        "HEAD_CATS_SCANNET_200": scannet200.HEAD_CATS_SCANNET_200,
        "COMMON_CATS_SCANNET_200": scannet200.COMMON_CATS_SCANNET_200,
        "TAIL_CATS_SCANNET_200": scannet200.TAIL_CATS_SCANNET_200,
    },
}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}
COMPARE_OPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}


class PointceptConfigError(ConversionError):
    """A Pointcept config that cannot be read safely; the message names file and line."""


def _construct(node: ast.AST) -> str:
    """A short human description of a refused node."""
    if isinstance(node, ast.Call):
        try:
            return f"call of {ast.unparse(node.func)}(...)"
        except Exception:  # unparse never fails on parsed code; belt and braces
            return "function call"
    if isinstance(node, ast.Attribute):
        return f"attribute access .{node.attr}"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "import"
    return type(node).__name__


class _Evaluator:
    """Evaluates one file's statements into a dict of its top-level names."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, node: ast.AST, what: str) -> PointceptConfigError:
        line = getattr(node, "lineno", "?")
        return PointceptConfigError(f"{self.path}:{line}: {what}")

    def refuse(self, node: ast.AST) -> PointceptConfigError:
        return self.fail(node, f"{_construct(node)} is not allowed in a config read by the converter "
                               f"(only assignments of literals, earlier names, dict(...) and the "
                               f"calls {', '.join(sorted(SAFE_CALLS))})")

    # --- statements ---------------------------------------------------------------------------
    def run(self, tree: ast.Module) -> dict:
        env: dict[str, Any] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign):
                value = self.expr(stmt.value, env)
                for target in stmt.targets:
                    self.assign(target, value, env)
            elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
                current = self.expr(ast.Name(id=stmt.target.id, ctx=ast.Load(), lineno=stmt.lineno), env)
                env[stmt.target.id] = self.binop(stmt, type(stmt.op), current, self.expr(stmt.value, env))
            elif isinstance(stmt, ast.Delete):
                for target in stmt.targets:
                    if not isinstance(target, ast.Name) or target.id not in env:
                        raise self.fail(stmt, f"del of {ast.unparse(target)}: only names bound earlier")
                    del env[target.id]
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstring or bare constant
            elif isinstance(stmt, ast.ImportFrom):
                env.update(self.import_from(stmt))
            else:
                raise self.refuse(stmt)
        return env

    def import_from(self, stmt: ast.ImportFrom) -> dict:
        """``from <module> import a, b as c`` of :data:`KNOWN_IMPORTS` -> {a: value, c: value}."""
        module = "." * stmt.level + (stmt.module or "")
        table = KNOWN_IMPORTS.get(module)
        if table is None:
            raise self.fail(stmt, f"import from {module} is not allowed in a config read by the converter; "
                                  f"it knows the tables of {', '.join(KNOWN_IMPORTS)}")
        out = {}
        for alias in stmt.names:
            if alias.name not in table:
                raise self.fail(stmt, f"{module}.{alias.name} is not known to the converter; known: "
                                      f"{', '.join(table)}")
            out[alias.asname or alias.name] = table[alias.name]
        return out

    def assign(self, target: ast.AST, value: Any, env: dict) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = list(value)
            if len(values) != len(target.elts):
                raise self.fail(target, f"cannot unpack {len(values)} values into {len(target.elts)} names")
            for t, v in zip(target.elts, values):
                self.assign(t, v, env)
        elif isinstance(target, ast.Subscript):
            container = self.expr(target.value, env)
            if not isinstance(container, (dict, list)):
                raise self.fail(target, "item assignment works on dicts and lists only")
            container[self.expr(target.slice, env)] = value
        else:
            raise self.refuse(target)

    # --- expressions --------------------------------------------------------------------------
    def expr(self, node: ast.AST, env: dict) -> Any:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise self.refuse(node)
        return method(node, env)

    def _Constant(self, node, env):
        return node.value

    def _Name(self, node, env):
        if node.id in env:
            return env[node.id]
        raise self.fail(node, f"name {node.id!r} is not defined (a config may only use names bound "
                              f"earlier in the same file)")

    def _List(self, node, env):
        return self.items(node.elts, env)

    def _Tuple(self, node, env):
        return tuple(self.items(node.elts, env))

    def _Set(self, node, env):
        return set(self.items(node.elts, env))

    def items(self, elts, env) -> list:
        out = []
        for e in elts:
            if isinstance(e, ast.Starred):
                out.extend(self.expr(e.value, env))
            else:
                out.append(self.expr(e, env))
        return out

    def _Dict(self, node, env):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                out.update(self.expr(v, env))
            else:
                out[self.expr(k, env)] = self.expr(v, env)
        return out

    def _Subscript(self, node, env):
        return self.expr(node.value, env)[self.expr(node.slice, env)]

    def _Slice(self, node, env):
        part = lambda n: None if n is None else self.expr(n, env)  # noqa: E731
        return slice(part(node.lower), part(node.upper), part(node.step))

    def binop(self, node, op_type, left, right):
        if op_type not in BIN_OPS:
            raise self.fail(node, f"operator {op_type.__name__} is not allowed")
        if op_type is ast.Pow and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise self.fail(node, f"exponent {right} is larger than {MAX_EXPONENT}")
        if op_type is ast.Mult:
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise self.fail(node, f"repetition makes more than {MAX_REPEAT} items")
        try:
            return BIN_OPS[op_type](left, right)
        except Exception as err:
            raise self.fail(node, f"{type(err).__name__}: {err}") from None

    def _BinOp(self, node, env):
        return self.binop(node, type(node.op), self.expr(node.left, env), self.expr(node.right, env))

    def _UnaryOp(self, node, env):
        return UNARY_OPS[type(node.op)](self.expr(node.operand, env))

    def _BoolOp(self, node, env):
        value = None
        for v in node.values:
            value = self.expr(v, env)
            if isinstance(node.op, ast.And) and not value or isinstance(node.op, ast.Or) and value:
                return value
        return value

    def _Compare(self, node, env):
        left = self.expr(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = self.expr(comp, env)
            if not COMPARE_OPS[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, node, env):
        return self.expr(node.body, env) if self.expr(node.test, env) else self.expr(node.orelse, env)

    def check_format(self, node, text: str) -> None:
        """Refuse format fields that reach into objects ("{0.__class__}", "{x[0]}")."""
        try:
            fields = [(f, spec) for _, f, spec, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as err:
            raise self.fail(node, f"bad format string: {err}") from None
        for field, spec in fields:
            if "." in field or "[" in field:
                raise self.fail(node, f"format field {{{field}}} reaches into an object: not allowed")
            if spec and "{" in spec:
                raise self.fail(node, "nested format fields are not allowed")

    def _JoinedStr(self, node, env):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            else:
                parts.append(self.expr(v, env))
        return "".join(parts)

    def _FormattedValue(self, node, env):
        value = self.expr(node.value, env)
        if node.conversion == ord("r"):
            value = repr(value)
        elif node.conversion == ord("s"):
            value = str(value)
        elif node.conversion == ord("a"):
            value = ascii(value)
        spec = self.expr(node.format_spec, env) if node.format_spec is not None else ""
        if "{" in spec:
            raise self.fail(node, "nested format fields are not allowed")
        return format(value, spec)

    def _Call(self, node, env):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "format":
            text = self.expr(func.value, env)
            if not isinstance(text, str):
                raise self.refuse(node)
            self.check_format(node, text)
            args, kwargs = self.call_args(node, env)
            return text.format(*args, **kwargs)
        if not isinstance(func, ast.Name) or func.id not in SAFE_CALLS or func.id in env:
            raise self.refuse(node)
        args, kwargs = self.call_args(node, env)
        try:
            return SAFE_CALLS[func.id](*args, **kwargs)
        except Exception as err:
            raise self.fail(node, f"{func.id}(...) failed: {type(err).__name__}: {err}") from None

    def call_args(self, node: ast.Call, env) -> tuple[list, dict]:
        args = self.items(node.args, env)
        kwargs: dict = {}
        for kw in node.keywords:
            if kw.arg is None:
                kwargs.update(self.expr(kw.value, env))
            else:
                kwargs[kw.arg] = self.expr(kw.value, env)
        return args, kwargs

    def comprehension(self, node, env, emit) -> None:
        """Run ``node.generators`` in a child scope, calling ``emit(scope)`` per item."""

        def loop(i: int, scope: dict) -> None:
            if i == len(node.generators):
                emit(scope)
                return
            gen = node.generators[i]
            if gen.is_async:
                raise self.refuse(node)
            for item in self.expr(gen.iter, scope):
                inner = dict(scope)
                self.assign(gen.target, item, inner)
                if all(self.expr(cond, inner) for cond in gen.ifs):
                    loop(i + 1, inner)

        loop(0, dict(env))

    def _ListComp(self, node, env):
        out: list = []
        self.comprehension(node, env, lambda s: out.append(self.expr(node.elt, s)))
        return out

    _GeneratorExp = _ListComp

    def _SetComp(self, node, env):
        return set(self._ListComp(node, env))

    def _DictComp(self, node, env):
        out: dict = {}
        self.comprehension(node, env, lambda s: out.__setitem__(self.expr(node.key, s), self.expr(node.value, s)))
        return out


def merge_into(child: dict, base: dict) -> dict:
    """Pointcept's ``Config._merge_a_into_b(child, base)``: dicts merge recursively, other
    values replace, ``_delete_=True`` in a child dict replaces the base's dict (not in place)."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict):
            value = dict(value)
            delete = value.pop(DELETE_KEY, False)
            if key in out and not delete:
                if not isinstance(out[key], dict):
                    raise PointceptConfigError(
                        f"{key}={value} cannot merge into the base's non-dict {key}; "
                        f"set {DELETE_KEY}=True to replace it")
                out[key] = merge_into(value, out[key])
                continue
            out[key] = _strip_delete(value)
        else:
            out[key] = value
    return out


def _strip_delete(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items() if k != DELETE_KEY}
    return value


def load_pointcept_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Evaluate a Pointcept config file (and its ``_base_`` files) into a plain dict.

    Raises:
        PointceptConfigError: unreadable file, syntax error, a construct outside the safe
            subset (file, line and construct named), a missing or circular ``_base_`` file.
    """
    path = Path(path)
    where = f" (a _base_ of {_chain[-1]})" if _chain else ""
    if not path.is_file():
        raise PointceptConfigError(f"config file {path} does not exist{where}")
    if path.resolve() in _chain or len(_chain) > MAX_BASE_DEPTH:
        raise PointceptConfigError(f"config {path}: circular or too deep _base_ chain")
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise PointceptConfigError(f"cannot read config {path}{where}: {err}") from None
    except SyntaxError as err:
        raise PointceptConfigError(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    if "{{" in text and BASE_KEY + "." in text:
        raise PointceptConfigError(f"config {path} uses {{{{_base_.x}}}} placeholders, which the converter "
                                   f"does not support; write the value out")
    cfg = _Evaluator(path).run(tree)
    bases = cfg.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: dict = {}
    for name in bases:
        if not isinstance(name, str):
            raise PointceptConfigError(f"config {path}: {BASE_KEY} entries must be file paths, got {name!r}")
        base = load_pointcept_config(path.parent / name, (*_chain, path.resolve()))
        duplicate = sorted(merged.keys() & base.keys())
        if duplicate:
            raise PointceptConfigError(f"config {path}: key(s) {', '.join(duplicate)} appear in more than one "
                                       f"{BASE_KEY} file")
        merged.update(base)
    return merge_into(cfg, merged) if bases else _strip_delete(cfg)


def base_files(path: str | Path) -> list[Path]:
    """The ``_base_`` files a config needs (recursively; existing or not), for error messages
    and for users copying a config out of a Pointcept checkout."""
    path = Path(path)
    out: list[Path] = []
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return out
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == BASE_KEY for t in stmt.targets):
            try:
                names = ast.literal_eval(stmt.value)
            except ValueError:
                continue
            for name in [names] if isinstance(names, str) else names:
                base = path.parent / name
                out.append(base)
                out += base_files(base)
    return out


# --- the training recipe ----------------------------------------------------------------------
# What of a reference config's training recipe this project's config can hold, and what not.
# Reference defaults where a key is absent: torch's own (Pointcept passes the dicts through).
SGD_DEFAULTS = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}       # torch.optim.SGD
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "weight_decay": 0.01}                 # torch.optim.AdamW
ONECYCLE_DEFAULTS = {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4, "anneal_strategy": "cos",
                     "cycle_momentum": True, "base_momentum": 0.85, "max_momentum": 0.95, "three_phase": False}
OPTIMIZERS = {"SGD": ("sgd", ("momentum", "nesterov", "weight_decay")),
              "AdamW": ("adamw", ("betas", "weight_decay"))}
LOSSES = {("CrossEntropyLoss",): "ce", ("CrossEntropyLoss", "LovaszLoss"): "ce+lovasz"}
BLOCK_KEYWORD = "block"  # the PTv3 recipe's param_dicts keyword = this project's block group
RECIPE_KEYS = ("optimizer", "scheduler", "param_dicts", "epoch", "batch_size")


@dataclass
class Recipe:
    """A reference config's training recipe in this project's terms.

    Attributes:
        sections: ``{"optim": {...}, "train": {...}, "data": {...}}``: this project's config keys.
        mapped: one ``{"key", "value", "from"}`` per key set (``from``: the reference key).
        not_mapped: one line per reference setting with no counterpart here (what, and why).
    """

    sections: dict = field(default_factory=lambda: {"optim": {}, "train": {}, "data": {}})
    mapped: list = field(default_factory=list)
    not_mapped: list = field(default_factory=list)

    def put(self, key: str, value: Any, source: str) -> None:
        section, name = key.split(".")
        self.sections[section][name] = value
        self.mapped = [m for m in self.mapped if m["key"] != key] + [{"key": key, "value": value, "from": source}]

    def lines(self) -> list[str]:
        """``optim.lr = 0.006  (scheduler.max_lr[0])``, one per mapped key."""
        return [f"{m['key']} = {m['value']}  ({m['from']})" for m in self.mapped]


def _plain_value(value: Any) -> Any:
    return [_plain_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def training_recipe(ref: dict, prompts: bool = False, adaptive: bool = False) -> Recipe:
    """The optimiser, schedule, loss, parameter groups, epochs and batch of a reference config
    (``load_pointcept_config``'s dict) as this project's ``optim`` / ``train`` / ``data`` keys.

    Args:
        ref: the evaluated reference config (``model.criteria`` is read from its ``model``).
        prompts: the converted model has prompt parameters (``optim.prompt_lr_scale`` applies).
        adaptive: they include PDNorm modulations inside the blocks.

    Maps ``optimizer`` (SGD / AdamW: lr, momentum, nesterov, betas, weight decay; torch's
    defaults where a key is absent), ``scheduler`` (OneCycleLR: peak lr = ``max_lr[0]``,
    pct_start, div factors, momentum cycling), ``param_dicts`` keyword "block" ->
    ``optim.block_lr_scale`` (its peak / the base peak), ``model.criteria`` (CE, CE + Lovasz
    at equal weights) -> ``train.loss``, ``epoch`` -> ``train.epochs`` and ``epoch / eval_epoch``
    -> ``train.eval_every`` (the reference evaluates ``eval_epoch`` times), ``batch_size`` (total
    over the GPUs, as ``data.batch_size``), ``clip_grad``, ``mix_prob``, ``enable_amp``,
    ``sync_bn``. Everything else of the recipe is listed in ``not_mapped``.
    """
    r = Recipe()
    skip = r.not_mapped.append
    if not any(k in ref for k in RECIPE_KEYS):
        skip("the config holds no training recipe (optimizer, scheduler, param_dicts, epoch, batch_size): "
             "this project's defaults are kept; give the reference's config file to carry its recipe over")
    base = _optimizer(ref, r)
    peaks = _scheduler(ref, r, base)
    base = r.sections["optim"].get("lr", base)
    _param_groups(ref, r, base, peaks, prompts, adaptive)
    _criteria(ref, r)
    if "epoch" in ref:
        epochs = int(ref["epoch"])
        r.put("train.epochs", epochs, "epoch")
        evals = int(ref.get("eval_epoch") or epochs)
        if 0 < evals <= epochs and epochs % evals == 0:
            r.put("train.eval_every", epochs // evals, f"epoch / eval_epoch = {epochs} / {evals}: "
                                                       f"the reference evaluates {evals} times")
        else:
            skip(f"eval_epoch = {ref.get('eval_epoch')!r}: does not divide epoch {epochs}; train.eval_every kept")
    simple = (("batch_size", "data.batch_size", int, "total over all GPUs, as data.batch_size"),
              ("mix_prob", "data.mix3d_prob", float, ""), ("enable_amp", "train.amp", bool, ""),
              ("sync_bn", "train.sync_bn", bool, ""))
    for source, key, kind, why in simple:
        if source in ref and ref[source] is not None:
            r.put(key, kind(ref[source]), source + (f": {why}" if why else ""))
    if "clip_grad" in ref:
        off = ref["clip_grad"] is None
        r.put("optim.grad_clip", 0.0 if off else float(ref["clip_grad"]), "clip_grad" + (" = None: off" if off else ""))
    if int(ref.get("gradient_accumulation_steps") or 1) != 1:
        skip(f"gradient_accumulation_steps = {ref['gradient_accumulation_steps']}: this project steps every batch")
    _data_train(ref, r)
    return r


def _optimizer(ref: dict, r: Recipe) -> float | None:
    """``optimizer`` -> ``optim.name``, ``optim.lr`` and the optimiser's own keys; the lr."""
    opt = ref.get("optimizer")
    if not isinstance(opt, dict):
        if any(k in ref for k in RECIPE_KEYS):
            r.not_mapped.append("optimizer: not in the config; optim.name / lr / weight_decay keep this project's "
                                "defaults")
        return None
    kind = opt.get("type")
    if kind not in OPTIMIZERS:
        r.not_mapped.append(f"optimizer.type = {kind!r}: this project has {' and '.join(OPTIMIZERS)} (optim.name); "
                            f"optim.* keeps its defaults")
        return None
    name, keys = OPTIMIZERS[kind]
    defaults = SGD_DEFAULTS if name == "sgd" else ADAMW_DEFAULTS
    r.put("optim.name", name, "optimizer.type")
    lr = float(opt["lr"]) if "lr" in opt else None
    if lr is not None:
        r.put("optim.lr", lr, "optimizer.lr")
    for key in keys:
        value = opt.get(key, defaults[key])
        r.put(f"optim.{key}", _plain_value(value), f"optimizer.{key}" + ("" if key in opt else ": torch's default"))
    for key, value in opt.items():
        if key not in (*keys, "type", "lr"):
            r.not_mapped.append(f"optimizer.{key} = {value!r}: no counterpart in optim.*")
    return lr


def _scheduler(ref: dict, r: Recipe, base: float | None) -> list:
    """``scheduler`` (OneCycleLR) -> ``optim.scheduler`` and its keys; the peak lr of each group."""
    sch = ref.get("scheduler")
    if not isinstance(sch, dict):
        if any(k in ref for k in RECIPE_KEYS):
            r.not_mapped.append("scheduler: not in the config; optim.scheduler keeps this project's default")
        return []
    if sch.get("type") != "OneCycleLR":
        r.not_mapped.append(f"scheduler.type = {sch.get('type')!r}: this project's schedules are onecycle "
                            f"(OneCycleLR) and cosine (linear warm-up, then cosine); optim.scheduler kept")
        return []
    full = {**ONECYCLE_DEFAULTS, **sch}
    r.put("optim.scheduler", "onecycle", "scheduler.type = OneCycleLR")
    max_lr = sch.get("max_lr")
    peaks = list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr]
    if peaks and peaks[0] is not None:
        where = "scheduler.max_lr[0]" if isinstance(max_lr, (list, tuple)) else "scheduler.max_lr"
        r.put("optim.lr", float(peaks[0]), f"{where}: OneCycleLR's peak")
    for key in ("pct_start", "div_factor", "final_div_factor", "base_momentum", "max_momentum"):
        r.put(f"optim.{key}", float(full[key]), f"scheduler.{key}" + ("" if key in sch else ": torch's default"))
    r.put("optim.cycle_momentum", bool(full["cycle_momentum"]),
          "scheduler.cycle_momentum" + ("" if "cycle_momentum" in sch else ": torch's default"))
    if full["anneal_strategy"] != "cos":
        r.not_mapped.append(f"scheduler.anneal_strategy = {full['anneal_strategy']!r}: this project's OneCycle "
                            f"anneals by cosine")
    if full["three_phase"]:
        r.not_mapped.append("scheduler.three_phase = True: this project's OneCycle has two phases")
    for key, value in sch.items():
        if key not in (*ONECYCLE_DEFAULTS, "type", "max_lr"):
            r.not_mapped.append(f"scheduler.{key} = {value!r}: no counterpart in optim.*")
    return peaks


def _param_groups(ref: dict, r: Recipe, base: float | None, peaks: list, prompts: bool, adaptive: bool) -> None:
    """``param_dicts``: keyword "block" -> ``optim.block_lr_scale``; the prompts' scale."""
    groups = ref.get("param_dicts") or []
    unmapped = []
    for i, group in enumerate(groups):
        keyword = group.get("keyword")
        if len(peaks) == 1 and peaks[0] is not None:  # a scalar max_lr: OneCycleLR gives every group that peak
            peak, scale = peaks[0], 1.0
            why = f"lr {group.get('lr')} replaced by OneCycleLR's scalar max_lr {peaks[0]}"
        else:
            peak = peaks[i + 1] if len(peaks) > i + 1 and peaks[i + 1] is not None else group.get("lr")
            scale = group.get("lr_scale")
            why = f"lr_scale {scale}" if scale is not None else f"peak lr {peak} / {base}"
        if scale is None and peak is not None and base:
            scale = float(peak) / base
        if keyword == BLOCK_KEYWORD and scale is not None:
            r.put("optim.block_lr_scale", round(float(scale), 12), f"param_dicts[{i}] keyword 'block': {why}")
        else:
            unmapped.append(f"{keyword!r}" + (f" (lr {peak:g})" if isinstance(peak, (int, float)) else ""))
    if unmapped:
        shown = ", ".join(unmapped[:3]) + (f", ... ({len(unmapped)} groups)" if len(unmapped) > 3 else "")
        r.not_mapped.append(f"param_dicts keyword {shown}: this project's parameter groups are the prompts "
                            f"(optim.prompt_lr_scale) and the backbone blocks (keyword 'block', "
                            f"optim.block_lr_scale); these train at the base lr")
    if prompts and "optim.name" in {m["key"] for m in r.mapped} and not unmapped:
        r.put("optim.prompt_lr_scale", 1.0, "no param_dicts group for the prompts: the reference trains them at lr")
        if adaptive and r.sections["optim"].get("block_lr_scale", 1.0) != 1.0:
            r.not_mapped.append("PDNorm modulations inside the blocks: the reference's keyword 'block' trains them at "
                                "the block lr; here they are prompt parameters (optim.prompt_lr_scale)")


def _criteria(ref: dict, r: Recipe) -> None:
    """``model.criteria`` -> ``train.loss`` (CE, or CE + Lovasz, each at weight 1)."""
    criteria = (ref.get("model") or {}).get("criteria")
    if criteria is None:
        r.not_mapped.append("model.criteria: not in the config; train.loss keeps this project's default")
        return
    kinds = tuple(sorted(str(c.get("type")) for c in criteria))
    plain = all(float(c.get("loss_weight", 1.0)) == 1.0 and c.get("weight") is None
                and not c.get("label_smoothing") and c.get("mode", "multiclass") == "multiclass" for c in criteria)
    if kinds in LOSSES and plain:
        r.put("train.loss", LOSSES[kinds], "model.criteria = " + " + ".join(kinds))
    elif criteria:
        r.not_mapped.append(f"model.criteria = {list(criteria)!r}: this project's losses are "
                            f"{', '.join(LOSSES.values())} (equal weights, no class weights); train.loss keeps its "
                            f"default")


def _data_train(ref: dict, r: Recipe) -> None:
    """What of ``data.train`` is not read: the augmentation list and per-dataset loops."""
    train = (ref.get("data") or {}).get("train")
    if not isinstance(train, dict):
        return
    parts = train.get("datasets") if train.get("type") == "ConcatDataset" else [train]
    loops = [f"{p.get('type')} x{p['loop']}" for p in parts or [] if isinstance(p, dict) and p.get("loop", 1) != 1]
    if loops:
        r.not_mapped.append(f"data.train loops ({', '.join(loops)}): this project mixes datasets per batch "
                            f"(data.mix ratios, each 1 here) and repeats the first one by data.loop")
    if any(isinstance(p, dict) and p.get("transform") for p in parts or []):
        r.not_mapped.append("data.train transform list: not read; this project's training pipeline is fixed "
                            "(switches data.augment, data.elastic, data.color_drop, data.crop_points)")
