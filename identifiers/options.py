"""Options for choosing the rare identifier token."""

from ..data.options import PROMPT_OPTIONS
from ..options import Option, OptionSet

IDENTIFIER_OPTIONS = OptionSet(
    Option("count", 8, "How many identifiers to propose.", min=1, max=100),
    PROMPT_OPTIONS["class_word"],
    Option("min_token_id", 20000, "Only tokens merged this late into CLIP's BPE vocabulary (ids run 0–49407, "
           "frequent strings first): higher means rarer.", min=512, max=49405),
    Option("score", True, "Rank candidates by how little they move the text encoder's reading of "
           "'a photo of a <class>' (needs --base); without it, rarest first."),
)
