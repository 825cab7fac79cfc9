"""Parsing a pipeline file within a budget: its size, its nesting, and what its aliases expand to.

ruamel.yaml builds an alias as a second reference to the anchored object, so a 1 KB "billion
laughs" file loads in microseconds and blows up later, in whatever walks the tree (validation,
copies, JSON). The composer here counts, while it builds the node graph and before anything walks
it, what the document would hold with every alias expanded, and stops at the alias that goes past
the budget. Every load of a pipeline file (validation, `levers set`, the supervisor's watcher,
`levers plan --base`) goes through ``round_trip_yaml``.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode
from ruamel.yaml.scanner import RoundTripScanner

# The file's size is checked before parsing, as it is read (levers.pipeline.loading)
from levers.pipeline.loading import MAX_FILE_BYTES

# Nodes (keys, values, mappings, lists) of the document with every alias expanded. The bundled
# pipeline has 44 nodes a phase, so 256 such phases about 11,000. ruamel's round-trip parser
# spends about 0.1 ms and 1 KB on a node: the parse stops within a few seconds and ~30 MB.
MAX_NODES = 20_000
# Characters that aliases may add by repeating strings: as much as the file itself may hold.
MAX_ALIAS_CHARS = MAX_FILE_BYTES
# Aliases used in one file: enough for every one of 256 phases to share a few anchored blocks.
MAX_ALIASES = 2_000
# Mappings and lists nested in each other; a pipeline needs 4 levels, options a few more. Also keeps
# ruamel's recursive composer, and every recursive walk of the tree, far from Python's stack limit.
MAX_DEPTH = 64
TOO_DEEP = f"mappings and lists nested more than {MAX_DEPTH} deep; a pipeline needs far fewer"
# Digits of one integer: every bounded number has 7 at most; Python refuses to read past 4,300.
MAX_INT_CHARS = 100
INT_TAG = "tag:yaml.org,2002:int"


class BudgetExceeded(MarkedYAMLError):
    """The document goes past one of the budgets; ``problem_mark`` points at where it did."""


def round_trip_yaml() -> YAML:
    """A round-trip YAML whose loads refuse documents that go past the budgets."""
    yaml = YAML(typ="rt")
    yaml.Scanner = FlowDepthScanner
    yaml.Composer = BudgetComposer
    return yaml


class FlowDepthScanner(RoundTripScanner):
    """ruamel's round-trip scanner, refusing ``[`` and ``{`` nested past ``MAX_DEPTH``.

    The scanner reads up to 1,024 characters ahead of the composer (a ``[`` may start a key) and
    checks every open bracket at each token: 20,000 nested brackets cost a second before the
    composer sees the depth. Stopping here keeps that to ``MAX_DEPTH`` brackets.
    """

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: str) -> None:
        if len(self.flow_context) >= MAX_DEPTH:
            _refuse(self.reader.get_mark(), TOO_DEEP)
        super().fetch_flow_collection_start(TokenClass, to_push)


class BudgetComposer(Composer):
    """ruamel's composer, keeping the expanded size (nodes, characters) of every node it builds.

    A node's expanded size is itself (1 node, its scalar's characters) plus its children's. An
    alias adds the expanded size of the node it names, known when the alias is met: that node is
    complete by then, unless the alias is inside it (a recursive document, refused too). Each
    node is sized once, from its children's sizes, so this adds time linear in the file, and the
    budgets stop the parse as soon as they are passed.
    """

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False  # legal YAML; a warning would print outside our errors
        self._sizes: dict[int, tuple[int, int]] = {}
        self._nodes = 0  # of the document so far, aliases expanded
        self._alias_chars = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.parser.check_event(AliasEvent):
            self._count_alias(self.parser.peek_event())
            return super().compose_node(parent, index)
        mark = self.parser.peek_event().start_mark
        if self.depth >= MAX_DEPTH:  # ruamel's count of the collections around this node
            _refuse(mark, TOO_DEEP)
        self._count_nodes(1, mark, None)
        node = super().compose_node(parent, index)
        if isinstance(node, ScalarNode) and str(node.tag) == INT_TAG and len(node.value) > MAX_INT_CHARS:
            _refuse(node.start_mark, f"a number of {len(node.value):,} characters; write a bounded number")
        self._sizes[id(node)] = _expanded_size(node, self._sizes)
        return node

    def _count_nodes(self, count: int, mark: Any, alias: str | None) -> None:
        self._nodes += count
        if self._nodes <= MAX_NODES:
            return
        if alias is None:
            _refuse(mark, f"more than {MAX_NODES:,} keys and values in one file; a pipeline needs far fewer")
        _refuse(mark, f"alias *{alias} takes the file past {MAX_NODES:,} keys and values; write them out")

    def _count_alias(self, event: Any) -> None:
        target = self.anchors.get(event.anchor)
        if target is None:
            return  # ruamel reports the undefined alias
        self._aliases += 1
        if self._aliases > MAX_ALIASES:
            _refuse(event.start_mark, f"more than {MAX_ALIASES:,} aliases in one file; write the values out")
        if id(target) not in self._sizes:
            _refuse(event.start_mark, f"alias *{event.anchor} is inside the node it names (a recursive file)")
        nodes, chars = self._sizes[id(target)]
        self._count_nodes(nodes, event.start_mark, event.anchor)
        self._alias_chars += chars
        if self._alias_chars > MAX_ALIAS_CHARS:
            _refuse(
                event.start_mark, f"aliases repeat more than {MAX_ALIAS_CHARS:,} characters; write them out"
            )


def _refuse(mark: Any, problem: str) -> NoReturn:
    raise BudgetExceeded(problem=problem, problem_mark=mark)


def _expanded_size(node: Node, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    if isinstance(node, ScalarNode):
        return 1, len(node.value)
    children = [part for pair in node.value for part in pair] if isinstance(node, MappingNode) else node.value
    nodes, chars = 1, 0
    for child in children:
        child_nodes, child_chars = sizes[id(child)]
        nodes += child_nodes
        chars += child_chars
    return nodes, chars
