"""What one document adds to the knowledge graph, planned before the graph is touched; pure.

Every chunk becomes an episode (content: its context line, a blank line, its text). Entities are
found by a deterministic extractor: runs of two or more capitalised words (joined by "of", "for"
or "the" at most; leading sentence words such as "The" or "When" dropped) and acronyms of 2-8
capitals. Each chunk MENTIONS the entities in it; two entities named in one sentence are linked
by a MENTIONED_WITH fact whose text is the shortest such sentence. A fact is one edge per pair of
entities in the whole graph, shared by every document that states it (``phases.graph_store``
counts them in its weight), rather than a copy per document.

UUIDs are uuid5 of the graph, the document id and the chunk index (episodes), of the graph and
the entity's case-folded name (entities, shared by all documents of a graph), of the episode and
entity (mentions) and of the graph and the two entities (facts), so planning a document again
gives the same ids. The graph's writers
(``phases.graph_store``, ``phases.graph_llm``) and the phase (``phases.kg_ingest``) share these
types; this module imports none of them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

MAX_ENTITY_WORDS = 6
# Pairs are formed among this many entities of a sentence at most, bounding facts per sentence.
MAX_SENTENCE_ENTITIES = 6
MAX_FACT_CHARS = 500
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "levers:kg")
# A document's episodes carry this and its id as their source (graphiti's source_description).
SOURCE_PREFIX = "levers document "

_CAPITALISED = r"[A-Z][\w'’-]*"
_ENTITY = re.compile(
    rf"\b{_CAPITALISED}(?:[ \t]+(?:(?:of|for|the)[ \t]+)?{_CAPITALISED})+|\b[A-Z][A-Z0-9]{{1,7}}\b"
)
_ACRONYM = re.compile(r"^[A-Z][A-Z0-9]{1,7}$")
_SENTENCE_GAP = re.compile(r"(?<=[.!?])\s+|\n+")
_POSSESSIVE = re.compile(r"['’]s$")
# Capitalised only because they open a sentence or a heading: not part of a name.
_LEADING_WORDS = frozenset(
    {
        "a", "an", "and", "as", "at", "but", "by", "each", "every", "for", "from", "how", "if", "in",
        "into", "it", "its", "of", "on", "once", "or", "our", "so", "such", "that", "the", "their",
        "then", "these", "this", "those", "to", "we", "what", "when", "where", "which", "while", "why",
        "with", "you", "your",
    }
)  # fmt: skip


@dataclass(frozen=True)
class LLMSettings:
    """The Anthropic model and endpoint; ``base_url`` None lets the SDK read ANTHROPIC_BASE_URL."""

    model: str
    base_url: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class PlannedEpisode:
    uuid: str
    name: str
    content: str


@dataclass(frozen=True)
class PlannedEntity:
    uuid: str
    name: str


@dataclass(frozen=True)
class PlannedMention:
    uuid: str
    episode: str
    entity: str


@dataclass
class PlannedRelation:
    uuid: str
    source: str
    target: str
    fact: str
    episodes: list[str] = field(default_factory=list)


@dataclass
class GraphPlan:
    """Everything one document adds to graph ``group_id``; ``source`` tags its episodes.

    ``version_of``: the name whose versions replace each other (None: a document with no versions),
    ``version`` its number among them and ``keep_versions`` whether older ones stay (see
    ``phases.graph_versions``).
    """

    group_id: str
    document_id: str
    source: str
    version_of: str | None = None
    version: int = 0
    keep_versions: bool = False
    episodes: list[PlannedEpisode] = field(default_factory=list)
    entities: list[PlannedEntity] = field(default_factory=list)
    mentions: list[PlannedMention] = field(default_factory=list)
    relations: list[PlannedRelation] = field(default_factory=list)


def plan_document(
    document_id: str, name: str, group_id: str, chunks: Sequence[Mapping[str, Any]],
    version_of: str | None = None, version: int = 0, keep_versions: bool = False,
) -> GraphPlan:  # fmt: skip
    """The nodes and edges a document's chunks make; pure and deterministic."""
    plan = GraphPlan(
        group_id, document_id, f"{SOURCE_PREFIX}{document_id}", version_of, version, keep_versions
    )
    entities: dict[str, PlannedEntity] = {}
    relations: dict[str, PlannedRelation] = {}
    for position, item in enumerate(chunks):
        index = int(item.get("index", position))
        text = str(item.get("text", ""))
        episode = PlannedEpisode(
            uuid=_uuid(group_id, "episode", document_id, str(index)),
            name=f"{name} #{index + 1}",
            content=f"{item.get('context', '')}\n\n{text}".strip(),
        )
        plan.episodes.append(episode)
        mentioned: dict[str, None] = {}  # insertion-ordered set of entity uuids
        for sentence, names in sentence_entities(text):
            found = [
                entities.setdefault(key, PlannedEntity(_uuid(group_id, "entity", key), label))
                for key, label in names
            ]
            mentioned.update((entity.uuid, None) for entity in found)
            for first, second in combinations(found[:MAX_SENTENCE_ENTITIES], 2):
                _relate(relations, plan, first, second, sentence, episode.uuid)
        plan.mentions.extend(
            PlannedMention(_uuid(group_id, "mentions", episode.uuid, entity_uuid), episode.uuid, entity_uuid)
            for entity_uuid in mentioned
        )
    plan.entities = list(entities.values())
    plan.relations = list(relations.values())
    return plan


def _relate(
    relations: dict[str, PlannedRelation],
    plan: GraphPlan,
    first: PlannedEntity,
    second: PlannedEntity,
    sentence: str,
    episode_uuid: str,
) -> None:
    """Record that two entities share a sentence; the shortest such sentence states the fact."""
    source, target = sorted((first.uuid, second.uuid))
    key = f"{source}:{target}"
    relation = relations.get(key)
    if relation is None:
        relation = PlannedRelation(
            uuid=_uuid(plan.group_id, "relation", key),
            source=source,
            target=target,
            fact=sentence[:MAX_FACT_CHARS],
        )
        relations[key] = relation
    elif fact_order(sentence[:MAX_FACT_CHARS]) < fact_order(relation.fact):
        relation.fact = sentence[:MAX_FACT_CHARS]
    if episode_uuid not in relation.episodes:
        relation.episodes.append(episode_uuid)


def fact_order(sentence: str) -> tuple[int, str]:
    """Of two sentences stating a fact, the one that sorts first states it: the shorter (the more
    to the point), then the first alphabetically. So the graph is the same whichever order its
    documents arrive in (``phases.graph_store`` applies the same rule across documents)."""
    return len(sentence), sentence


def sentence_entities(text: str) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Per sentence of ``text``: the sentence and its distinct entities as (key, name), in order."""
    for raw in _SENTENCE_GAP.split(text):
        sentence = " ".join(raw.split())
        names: dict[str, str] = {}
        for match in _ENTITY.finditer(sentence):
            name = entity_name(match.group())
            if name:
                names.setdefault(name.casefold(), name)
        if names:
            yield sentence, list(names.items())


def entity_name(candidate: str) -> str | None:
    """The name in a capitalised run with sentence-opening words dropped; None if none is left."""
    words = candidate.split()
    while words and words[0].casefold() in _LEADING_WORDS:
        words.pop(0)
    if words:
        words[-1] = _POSSESSIVE.sub("", words[-1])  # "Redis's workers" names Redis; "Little's Law" stays
    if len(words) == 1 and _ACRONYM.match(words[0]):
        return words[0]
    if not 2 <= len(words) <= MAX_ENTITY_WORDS or words[-1].casefold() in _LEADING_WORDS:
        return None
    return " ".join(words)


def _uuid(group_id: str, kind: str, *parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "\x1f".join((group_id, kind, *parts))))
