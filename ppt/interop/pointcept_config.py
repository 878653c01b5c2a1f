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
