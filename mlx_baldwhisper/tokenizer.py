"""Whisper's tokenizer, read from the ``tokenizer.json`` that ships with the weights.

The special tokens (languages, tasks, timestamps) are located by name in that file,
so multilingual, English-only and 100-language (large-v3) vocabularies all work.
Timestamp tokens are not in tokenizer.json: they follow ``<|notimestamps|>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer

from .languages import LANGUAGES, TO_LANGUAGE_CODE


class UnknownLanguageError(ValueError):
    pass


def language_code(language: Optional[str], aliases: Optional[dict[str, str]] = None) -> Optional[str]:
    """Accept a code ("ha"), a name ("Hausa") or a fine-tuned model's mapped language
    (``aliases``, e.g. {"bm": "ha"}); raise a clear error otherwise."""
    if language is None:
        return None
    key = language.lower().strip()
    if key in LANGUAGES or key in (aliases or {}):
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UnknownLanguageError(
        f"unknown language {language!r}; use a Whisper language code such as 'en', 'ha', 'fr' "
        f"or a name such as 'Hausa' ({len(LANGUAGES)} languages are known)")


@dataclass
class Tokenizer:
    encoding: HFTokenizer
    special: dict[str, int]
    multilingual: bool
    language: Optional[str] = None
    task: Optional[str] = None
    # Extra language tokens a fine-tuned model maps to existing ids (e.g. "bm" -> "<|ha|>").
    language_aliases: dict[str, str] = field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([i for i in ids if i < self.timestamp_begin],
                                    skip_special_tokens=False)

    def decode_with_timestamps(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i >= self.timestamp_begin:
                out.append(self.decode(run))
                run = []
                out.append(f"<|{(i - self.timestamp_begin) * 0.02:.2f}|>")
            else:
                run.append(i)
        out.append(self.decode(run))
        return "".join(out)

    # ---- special tokens -------------------------------------------------------------
    @property
    def eot(self) -> int:
        return self.special["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self.special["<|startoftranscript|>"]

    @property
    def transcribe(self) -> int:
        return self.special["<|transcribe|>"]

    @property
    def translate(self) -> int:
        return self.special["<|translate|>"]

    @property
    def sot_lm(self) -> int:
        return self.special["<|startoflm|>"]

    @property
    def sot_prev(self) -> int:
        return self.special["<|startofprev|>"]

    @property
    def no_speech(self) -> int:
        return self.special.get("<|nospeech|>", self.special.get("<|nocaptions|>"))

    @property
    def no_timestamps(self) -> int:
        return self.special["<|notimestamps|>"]

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @cached_property
    def all_language_codes(self) -> list[str]:
        return [c for c in LANGUAGES if f"<|{c}|>" in self.special]

    @cached_property
    def all_language_tokens(self) -> list[int]:
        return [self.special[f"<|{c}|>"] for c in self.all_language_codes]

    def language_token(self, code: str) -> int:
        code = self.language_aliases.get(code, code)
        tok = self.special.get(f"<|{code}|>")
        if tok is None:
            raise UnknownLanguageError(f"this model has no token for language {code!r}")
        return tok

    @property
    def sot_sequence(self) -> tuple[int, ...]:
        seq = [self.sot]
        if self.multilingual:
            if self.language is not None:
                seq.append(self.language_token(self.language))
            if self.task is not None:
                seq.append(self.translate if self.task == "translate" else self.transcribe)
        return tuple(seq)

    @property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return self.sot_sequence + (self.no_timestamps,)

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Symbols a speaker does not say, suppressed by ``suppress_tokens="-1"``."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in miscellaneous:
                    result.add(ids[0])
        return tuple(sorted(result))

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        if self.language in {"zh", "ja", "th", "lo", "my", "yue"}:
            return self._split_unicode(tokens)
        words, word_tokens = [], []
        for text, toks in zip(*self._split_unicode(tokens)):
            special = toks[0] >= self.eot
            starts_word = text.startswith(" ")
            punct = text.strip() in _PUNCTUATION
            if special or starts_word or punct or not words:
                words.append(text)
                word_tokens.append(list(toks))
            else:
                words[-1] += text
                word_tokens[-1].extend(toks)
        return words, word_tokens

    def _split_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Group tokens into the smallest runs that decode to whole characters."""
        words, word_tokens, current = [], [], []
        for t in tokens:
            current.append(t)
            text = self.decode_with_timestamps(current)
            if "\ufffd" not in text:
                words.append(text)
                word_tokens.append(current)
                current = []
        return words, word_tokens


_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@lru_cache(maxsize=8)
def _read(path: str) -> tuple[HFTokenizer, tuple[tuple[str, int], ...]]:
    tok = HFTokenizer.from_file(path)
    added = json.loads(Path(path).read_text(encoding="utf-8")).get("added_tokens", [])
    return tok, tuple((a["content"], a["id"]) for a in added)


def get_tokenizer(
    tokenizer_dir: Path | str,
    multilingual: bool = True,
    language: Optional[str] = None,
    task: Optional[str] = None,
    language_aliases: Optional[dict[str, str]] = None,
) -> Tokenizer:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    encoding, added = _read(str(path))
    if multilingual:
        language = language_code(language, language_aliases) or "en"
        task = task or "transcribe"
    else:
        language, task = "en", None
    tok = Tokenizer(encoding, dict(added), multilingual, language, task, dict(language_aliases or {}))
    if multilingual and language not in tok.language_aliases:
        tok.language_token(language)  # fail early on a language this vocabulary lacks
    return tok
