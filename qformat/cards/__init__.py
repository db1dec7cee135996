"""Model cards generated from a checkpoint's own metadata, and a linter that checks a card against it."""

from qformat.cards.check import check_card
from qformat.cards.facts import CardFacts, card_facts
from qformat.cards.render import render_card, write_card

__all__ = ["CardFacts", "card_facts", "check_card", "render_card", "write_card"]
