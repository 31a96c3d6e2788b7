"""The rewrite engine: patterns written like the math they match, guards that decline with a reason,
builders, and per-rule statistics.

A pattern is built from

- ``V("x")``: any value, captured by name (a name used twice must be the same node);
- ``C("eps")`` / a python number: a scalar CONST (its value captured / required);
- ``O.MUL(a, b)``, ``O.MEAN(a, axes=A("axes"))`` and the operators ``+ - * / **`` and unary ``-``:
  an op with its inputs; attributes given as values must be equal, ``A("name")`` captures one;
  commutative ops (``ops.COMMUTATIVE``) match either operand order;
- ``maybe_cast(p)``: ``p`` or ``CAST(p)`` (HF's float32 upcasts / downcasts);
- ``any_of(p, q, ...)``: the first alternative that matches.

``HF RMSNorm  =  V("w") * maybe_cast(x * O.RSQRT(O.MEAN(x ** 2, axes=A("axes"), keepdim=True) + C("eps")))``

A :class:`Rule` is ``(name, pattern, guard, build)``: ``guard(m)`` returns None to accept or a reason
string to decline; ``build(graph, m)`` returns the node that replaces the match's root. Unless a
rule says ``shared_ok=True``, a match whose interior values have users outside the match is declined
(the rewrite would have to keep computing them). :func:`rewrite` runs rules to a fixed point,
consumers first, so the largest pattern at a site wins; rules are indexed by the op of their root, and
every match of a rule is tried (another operand order, another alternative) until one is accepted, the
reasons of the near misses kept. Dead nodes leave the graph once per round.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..ir.graph import Graph, Node, check_attrs, dims_equal_shapes, infer
from ..ir.ops import COMMUTATIVE, OPS, ShapeError
from ..ir.types import TType, shape_str
from .report import PassStats


class Match(dict):
    """Captures by name (nodes, attribute values, constants) plus the interior nodes matched by ops."""

    def __init__(self, *a, interior: tuple = (), **kw):
        super().__init__(*a, **kw)
        self.interior = interior
        self.outputs: frozenset = frozenset()  # the graph's outputs, set by rewrite() before the guard runs

    def readers(self, node: Node) -> int:
        """How many nodes read ``node``, a graph output counting as one more."""
        return len(node.users) + int(node in self.outputs)

    def extend(self, key: str | None = None, value=None, node: Node | None = None) -> "Match | None":
        if key is not None and key in self:
            same = self[key] is value if isinstance(value, Node) or isinstance(self[key], Node) else self[key] == value
            if not same:
                return None
        m = Match(self, interior=self.interior + ((node,) if node is not None else ()))
        if key is not None:
            m[key] = value
        return m

    @property
    def root(self) -> Node:
        return self.interior[0]


class Pat(ABC):
    @abstractmethod
    def match(self, node: Node, m: Match) -> Iterator[Match]:
        """Every way this pattern matches at ``node``, extending ``m``."""

    def roots(self) -> frozenset | None:
        """The ops a node this pattern matches can have; None: any op."""
        return None

    # the math operators build op patterns
    def __add__(self, o):
        return OpPat("ADD", (self, lift(o)), {})

    def __radd__(self, o):
        return OpPat("ADD", (lift(o), self), {})

    def __sub__(self, o):
        return OpPat("SUB", (self, lift(o)), {})

    def __rsub__(self, o):
        return OpPat("SUB", (lift(o), self), {})

    def __mul__(self, o):
        return OpPat("MUL", (self, lift(o)), {})

    def __rmul__(self, o):
        return OpPat("MUL", (lift(o), self), {})

    def __truediv__(self, o):
        return OpPat("DIV", (self, lift(o)), {"rounding": None})

    def __pow__(self, o):
        return OpPat("POW", (self, lift(o)), {})

    def __neg__(self):
        return OpPat("NEG", (self,), {})


def lift(p) -> Pat:
    if isinstance(p, Pat):
        return p
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return C(value=p)
    raise TypeError(f"not a pattern: {p!r}")


@dataclass(frozen=True, eq=False)
class V(Pat):
    """Any value; ``name`` captures it."""
    name: str | None = None
    where: Callable[[Node], bool] | None = None

    def match(self, node, m):
        if self.where is not None and not self.where(node):
            return
        r = m.extend(self.name, node) if self.name else m
        if r is not None:
            yield r


@dataclass(frozen=True, eq=False)
class C(Pat):
    """A scalar CONST: ``C("eps")`` captures its value, ``C(value=2)`` requires it."""
    name: str | None = None
    value: float | None = None

    def roots(self):
        return frozenset({"CONST"})

    def match(self, node, m):
        if node.op != "CONST" or isinstance(node.attrs["value"], tuple):
            return
        v = node.attrs["value"]
        if self.value is not None and (isinstance(v, bool) or v != self.value):
            return
        r = m.extend(self.name, v) if self.name else m
        if r is not None:
            yield r


@dataclass(frozen=True)
class A:
    """Captures an attribute's value by name."""
    name: str


@dataclass(frozen=True, eq=False)
class OpPat(Pat):
    op: str
    inputs: tuple
    attrs: dict = field(default_factory=dict)

    def roots(self):
        return frozenset({self.op})

    def match(self, node, m):
        if node.op != self.op or len(node.inputs) != len(self.inputs):
            return
        m = m.extend(node=node)
        for k, want in self.attrs.items():
            got = node.attrs.get(k)
            if isinstance(want, A):
                m = m.extend(want.name, got)
            elif got != want:
                return
            if m is None:
                return
        orders = [self.inputs]
        if self.op in COMMUTATIVE and len(self.inputs) == 2:
            orders.append(self.inputs[::-1])
        for pats in orders:
            yield from _match_all(pats, node.inputs, m)


def _match_all(pats, nodes, m) -> Iterator[Match]:
    if not pats:
        yield m
        return
    for m1 in pats[0].match(nodes[0], m):
        yield from _match_all(pats[1:], nodes[1:], m1)


@dataclass(frozen=True, eq=False)
class AnyOf(Pat):
    alternatives: tuple

    def roots(self):
        each = [p.roots() for p in self.alternatives]
        return None if any(r is None for r in each) else frozenset().union(*each)

    def match(self, node, m):
        for p in self.alternatives:
            yield from p.match(node, m)


def any_of(*alternatives) -> Pat:
    return AnyOf(tuple(lift(p) for p in alternatives))


def maybe_cast(p, name: str | None = None) -> Pat:
    """``p`` or ``CAST(p)``; ``name`` captures the cast's target dtype (None when there is no cast)."""
    p = lift(p)
    cast = OpPat("CAST", (p,), {"dtype": A(name)} if name else {})
    return AnyOf((cast, _Bind(p, name, None) if name else p))


@dataclass(frozen=True, eq=False)
class _Bind(Pat):
    """``p``, binding ``name`` to a fixed value (the absent branch of an optional capture)."""
    p: Pat
    name: str
    value: object

    def roots(self):
        return self.p.roots()

    def match(self, node, m):
        m = m.extend(self.name, self.value)
        if m is not None:
            yield from self.p.match(node, m)


class _Ops:
    """``O.RSQRT(x)``, ``O.MEAN(x, axes=A("axes"), keepdim=True)``: an op pattern by op name."""

    def __getattr__(self, op: str):
        if op not in OPS:
            raise AttributeError(f"no op {op!r} in the op set")
        return lambda *inputs, **attrs: OpPat(op, tuple(lift(i) for i in inputs), attrs)


O = _Ops()  # noqa: E741  O.MUL(...) reads like the math


# ----------------------------------------------------------------------------- rules and the driver


@dataclass
class Rule:
    """``pattern`` matched at a root node; ``guard(m)`` -> None or the reason to decline;
    ``build(graph, m)`` -> the replacement of the root. The docstring of the pass gives the formula."""
    name: str
    pattern: Pat
    build: Callable[[Graph, Match], Node]
    guard: Callable[[Match], str | None] = lambda m: None
    shared_ok: bool = False  # interior values may have other users (they are then kept)


def type_reason(op: str, inputs: list[TType], root: Node, shape_error_prefix: str = "", **attrs) -> str | None:
    """Why a fused ``op`` on operands of these types cannot replace ``root`` (its type rule refuses them, or
    it would give another shape or dtype), or None: the check every builder's guard ends with."""
    try:
        t = infer(op, inputs, check_attrs(op, attrs))
    except ShapeError as e:
        return f"{shape_error_prefix}{e}"
    if t.dtype != root.dtype or not dims_equal_shapes(t.shape, root.shape):
        return f"{op} would give {t.dtype}{shape_str(t.shape)} where the pattern gives {root.dtype}{shape_str(root.shape)}"
    return None


def first_match(pattern: Pat, node: Node) -> Match | None:
    return next(iter(pattern.match(node, Match())), None)


def _escaping(m: Match, outputs: set) -> Node | None:
    """An interior node (not the root) with a user outside the match, or a graph output."""
    inside = set(m.interior)
    for n in m.interior[1:]:
        if n in outputs or any(u not in inside for u in n.users):
            return n
    return None


def _fit(rule: Rule, node: Node, outputs: frozenset) -> tuple[Match | None, list[str]]:
    """The first match of ``rule`` at ``node`` that its guard (and the shared-intermediate check) accepts, and
    the reasons the matches before it were declined: a declined match lets the next operand order or
    alternative try."""
    reasons: list[str] = []
    for m in rule.pattern.match(node, Match()):
        m.outputs = outputs
        reason = rule.guard(m)
        if reason is None and not rule.shared_ok:
            esc = _escaping(m, outputs)
            if esc is not None:
                reason = f"the intermediate value {esc.name} ({esc.op}) has other users"
        if reason is None:
            return m, reasons
        if reason not in reasons:
            reasons.append(reason)
    return None, reasons


class RuleIndex:
    """Rules by the op of the node they can match at, in the rules' order (order decides which fires first)."""

    def __init__(self, rules: list[Rule]):
        self.rules = [(r, r.pattern.roots()) for r in rules]
        self._by_op: dict[str, list[Rule]] = {}

    def __call__(self, op: str) -> list[Rule]:
        found = self._by_op.get(op)
        if found is None:
            found = self._by_op[op] = [r for r, roots in self.rules if roots is None or op in roots]
        return found


def _unlink_dead(node: Node, outputs: set, dead: set) -> None:
    """``node`` and what only it read, once nothing reads them, leave their inputs' users (so guards and the
    shared-intermediate check see the graph as it is); ``Graph.remove_dead`` drops them once per round."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n in dead or n.users or n in outputs or n.op == "INPUT":
            continue
        dead.add(n)
        for i in n.inputs:
            i.users.pop(n, None)
            stack.append(i)


def rewrite(graph: Graph, rules: list[Rule], stats: PassStats | None = None, max_rounds: int = 10) -> PassStats:
    """Apply ``rules`` until none fires (consumers first, so the largest pattern at a site wins). At each node
    the rules indexed under its op are tried in order, each with every match until one is accepted. Every
    rewrite and every decline (the first reason, near misses in ``also``) is counted in ``stats`` per rule."""
    stats = stats if stats is not None else PassStats()
    index, declined = RuleIndex(rules), set()
    for _ in range(max_rounds):
        fired, dead = False, set()
        outputs = frozenset(graph.outputs)
        for node in reversed(list(graph.nodes)):
            if node in dead:
                continue  # replaced earlier in this round
            for rule in index(node.op):
                m, reasons = _fit(rule, node, outputs)
                if m is None:
                    key = (rule.name, node.name, tuple(reasons))
                    if reasons and key not in declined:
                        declined.add(key)
                        stats.decline(reasons[0], node, rule=rule.name, **({"also": reasons[1:]} if len(reasons) > 1 else {}))
                    continue
                new = rule.build(graph, m)
                new.loc = new.loc or node.loc
                graph.replace_all_uses(node, new)
                outputs = frozenset(graph.outputs)
                _unlink_dead(node, outputs, dead)
                stats.rewritten += 1
                stats.rules[rule.name] = stats.rules.get(rule.name, 0) + 1
                fired = True
                break
        graph.remove_dead()
        graph.toposort()
        if not fired:
            break
    return stats
