"""Bug injection with libcst: one small semantic change at one site.

Each operator visits a module in a fixed order and counts the sites it could
change; ``mutate(source, operator, site)`` changes only site number ``site``
and returns the new source (formatting and comments elsewhere untouched, which
libcst guarantees by round-tripping the concrete syntax tree).  Operators:

  flip_arithmetic   a + b <-> a - b, a * b -> a // b, a // b -> a * b, a % b -> a // b
  flip_comparison   < <-> <=, > <-> >=, == <-> !=, in <-> not in
  flip_boolean      and <-> or
  change_constant   integer literal n -> n + 1 (0, 1 and 2 -> 1, 0 and 1)
  negate_condition  if / elif / while test T -> not (T)
  remove_condition  `if T: body` without else -> body run unconditionally
  remove_statement  drop an assignment or expression statement from a block of two or more
  swap_arguments    f(a, b, ...) -> f(b, a, ...)
"""
from __future__ import annotations

from typing import Sequence

import libcst as cst

_ARITHMETIC = {cst.Add: cst.Subtract, cst.Subtract: cst.Add, cst.Multiply: cst.FloorDivide,
               cst.FloorDivide: cst.Multiply, cst.Modulo: cst.FloorDivide}
_COMPARISON = {cst.LessThan: cst.LessThanEqual, cst.LessThanEqual: cst.LessThan,
               cst.GreaterThan: cst.GreaterThanEqual, cst.GreaterThanEqual: cst.GreaterThan,
               cst.Equal: cst.NotEqual, cst.NotEqual: cst.Equal, cst.In: cst.NotIn,
               cst.NotIn: cst.In}
_CONSTANTS = {"0": "1", "1": "0", "2": "1"}


class _SiteTransformer(cst.CSTTransformer):
    """Counts the sites of one operator and rewrites site ``target`` (-1: none)."""

    def __init__(self, operator: str, target: int):
        super().__init__()
        self.operator, self.target, self.count = operator, target, 0
        self.description = ""
        self._elifs: set[int] = set()  # an elif cannot be replaced by its body

    def _hit(self, description: str) -> bool:
        hit = self.count == self.target
        self.count += 1
        if hit:
            self.description = description
        return hit

    def leave_BinaryOperation(self, original, updated):
        new_op = _ARITHMETIC.get(type(updated.operator))
        if self.operator == "flip_arithmetic" and new_op and self._hit(
                f"{type(updated.operator).__name__} -> {new_op.__name__}"):
            return updated.with_changes(operator=new_op(
                whitespace_before=updated.operator.whitespace_before,
                whitespace_after=updated.operator.whitespace_after))
        return updated

    def leave_ComparisonTarget(self, original, updated):
        new_op = _COMPARISON.get(type(updated.operator))
        if self.operator == "flip_comparison" and new_op and self._hit(
                f"{type(updated.operator).__name__} -> {new_op.__name__}"):
            return updated.with_changes(operator=new_op())
        return updated

    def leave_BooleanOperation(self, original, updated):
        new_op = cst.Or if isinstance(updated.operator, cst.And) else cst.And
        if self.operator == "flip_boolean" and self._hit(
                f"{type(updated.operator).__name__} -> {new_op.__name__}"):
            return updated.with_changes(operator=new_op())
        return updated

    def leave_Integer(self, original, updated):
        value = updated.value
        if self.operator == "change_constant" and value.isdigit():
            new_value = _CONSTANTS.get(value, str(int(value) + 1))
            if self._hit(f"constant {value} -> {new_value}"):
                return updated.with_changes(value=new_value)
        return updated

    def _negate(self, updated, kind):
        if self.operator == "negate_condition" and self._hit(f"negated {kind} condition"):
            test = updated.test
            if not test.lpar:
                test = test.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
            return updated.with_changes(test=cst.UnaryOperation(cst.Not(), test))
        return updated

    def leave_While(self, original, updated):
        return self._negate(updated, "while")

    def visit_If(self, node):
        if isinstance(node.orelse, cst.If):
            self._elifs.add(id(node.orelse))
        return True

    def leave_If(self, original, updated):
        updated = self._negate(updated, "if")
        if (self.operator == "remove_condition" and updated.orelse is None
                and id(original) not in self._elifs
                and isinstance(updated.body, cst.IndentedBlock)
                and self._hit("removed if condition")):
            return cst.FlattenSentinel(updated.body.body)
        return updated

    def leave_IndentedBlock(self, original, updated):
        if self.operator != "remove_statement" or len(updated.body) < 2:
            return updated
        body = list(updated.body)
        for index, statement in enumerate(body):
            if _removable(statement) and self._hit("removed statement"):
                del body[index]
                return updated.with_changes(body=body)
        return updated

    def leave_Call(self, original, updated):
        positional = [i for i, arg in enumerate(updated.args) if arg.keyword is None and not arg.star]
        if self.operator == "swap_arguments" and len(positional) >= 2 and self._hit("swapped arguments"):
            args = list(updated.args)
            i, j = positional[0], positional[1]
            # Keep each slot's comma so the call stays well-formed.
            args[i], args[j] = (updated.args[j].with_changes(comma=updated.args[i].comma),
                                updated.args[i].with_changes(comma=updated.args[j].comma))
            return updated.with_changes(args=args)
        return updated


def _removable(statement: cst.CSTNode) -> bool:
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return False
    small = statement.body[0]
    if isinstance(small, cst.Expr):  # keep docstrings: removing them changes nothing
        return not isinstance(small.value, (cst.SimpleString, cst.ConcatenatedString))
    return isinstance(small, (cst.Assign, cst.AugAssign, cst.AnnAssign))


OPERATORS: Sequence[str] = ("flip_arithmetic", "flip_comparison", "flip_boolean", "change_constant",
                            "negate_condition", "remove_condition", "remove_statement",
                            "swap_arguments")


def count_sites(source: str, operator: str) -> int:
    """How many sites of ``operator`` the module has."""
    transformer = _SiteTransformer(_check(operator), -1)
    cst.parse_module(source).visit(transformer)
    return transformer.count


def mutate(source: str, operator: str, site: int) -> tuple[str, str]:
    """Applies ``operator`` at site index ``site``; returns (new source, description)."""
    transformer = _SiteTransformer(_check(operator), site)
    new = cst.parse_module(source).visit(transformer)
    if not transformer.description:
        raise ValueError(f"site must be in [0, {transformer.count}) for {operator!r}, got {site}")
    return new.code, transformer.description


def _check(operator: str) -> str:
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {list(OPERATORS)}, got {operator!r}")
    return operator


def remove_functions(source: str, names: set[str]) -> str:
    """Deletes the module-level functions called ``names`` (to hide tests)."""

    class _Remover(cst.CSTTransformer):
        def leave_FunctionDef(self, original, updated):
            if original.name.value in names:
                return cst.RemoveFromParent()
            return updated

        def visit_FunctionDef(self, node):
            return False  # only module-level functions

        def visit_ClassDef(self, node):
            return False

    return cst.parse_module(source).visit(_Remover()).code
