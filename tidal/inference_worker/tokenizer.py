"""Text to token ids and back, and chat prompts, for the worker's checkpoints.

One :class:`Tokenizer` over a ``tokenizers.Tokenizer``, built either from a Hugging Face
``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``) or from a GGUF file's
``tokenizer.ggml.*`` metadata (byte-level BPE, as llama.cpp and transformers read it). Chat
templates render as transformers renders them: in Jinja's immutable sandbox, with ``tojson``
and ``raise_exception``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from tidal.inference_worker.weights.hf import WeightsError, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

CONTROL = 3  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
USER_DEFINED = 4

# How llama.cpp's pre-tokenizer types (tokenizer.ggml.pre) split text before byte-level BPE;
# the ones not listed use GPT-2's split (ByteLevel's own regex), as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class TokenizerError(WeightsError):
    """A tokenizer the worker cannot build or use; the message names the file or field."""


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF file's ``tokenizer.*`` metadata (what :func:`~tidal.inference_worker.weights.gguf.
    load_gguf` reads), enough to rebuild its tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" is byte-level BPE
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    extra_eos_token_ids: tuple[int, ...] = ()  # eot / eom tokens: generation stops there too
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    origin: str = "GGUF file"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of each byte as a printable character (byte-level BPE's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: Jinja's own tojson escapes HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@cache
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@dataclass
class Tokenizer:
    backend: Backend
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None = None
    # The template's variables besides the messages: bos_token, eos_token, unk_token, pad_token.
    special_tokens: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer adds (BOS)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        found = self.backend.token_to_id(token)
        return None if found is None else int(found)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The prompt the model's chat template renders for ``messages`` (as transformers'
        ``apply_chat_template(..., tokenize=False)``); ``variables`` (``tools``, ...) reach the
        template too."""
        if not self.chat_template:
            raise TokenizerError("the checkpoint's tokenizer has no chat template")
        context: dict[str, Any] = {**self.special_tokens, **variables}
        context["messages"] = [dict(m) for m in messages]
        context["add_generation_prompt"] = add_generation_prompt
        return _compile(self.chat_template).render(**context)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The rendered chat prompt's ids; the template writes any BOS itself."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )

    # ------------------------------------------------------------------ build

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """From a Hugging Face directory: ``tokenizer.json``, and when present
        ``tokenizer_config.json`` (special tokens, chat template), ``chat_template.jinja`` and
        ``generation_config.json`` / ``config.json`` (the ids generation stops at)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"tokenizer file {path} is corrupt: {e}") from e
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
        special = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name))) is not None
        }
        template = cls._hf_chat_template(directory, config, config_path)

        def id_of(name: str) -> int | None:
            text = special.get(name)
            found = backend.token_to_id(text) if text is not None else None
            return None if found is None else int(found)

        eos: list[int] = []
        eos_id = id_of("eos_token")
        if eos_id is not None:
            eos.append(eos_id)
        for extra in (GENERATION_CONFIG_FILE, "config.json"):
            extra_path = directory / extra
            if extra_path.is_file():
                eos += _ids(read_json(extra_path, extra).get("eos_token_id"))
        bos_id = id_of("bos_token")
        if bos_id is None and (directory / "config.json").is_file():
            bos = _ids(read_json(directory / "config.json", "config file").get("bos_token_id"))
            bos_id = bos[0] if bos else None
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            chat_template=template,
            special_tokens=special,
        )

    @staticmethod
    def _hf_chat_template(directory: Path, config: dict[str, Any], origin: Path) -> str | None:
        jinja_file = directory / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        json_file = directory / "chat_template.json"
        template: Any = config.get("chat_template")
        if template is None and json_file.is_file():
            template = read_json(json_file, "chat template").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{origin}: field 'chat_template' is not a string")
        return template

    @classmethod
    def from_gguf(cls, vocab: GGUFVocab) -> Tokenizer:
        """Byte-level BPE from GGUF metadata, as transformers' GGUF loader builds it: the
        vocabulary (re-spelled in GPT-2's byte alphabet where a file stores raw text), the
        merges, control tokens (type 3) as special tokens and user-defined ones (type 4) as
        added tokens, the split regex of ``tokenizer.ggml.pre``."""
        if vocab.model != "gpt2":
            raise TokenizerError(
                f"{vocab.origin}: tokenizer.ggml.model {vocab.model!r} is not supported yet "
                "(only 'gpt2', byte-level BPE); use a Hugging Face checkpoint with tokenizer.json"
            )
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        table = {
            token
            if set(token) <= alphabet
            else "".join(spelling[b] for b in token.encode("utf-8")): index
            for index, token in enumerate(vocab.tokens)
        }
        merges: list[tuple[str, str]] = []
        for number, merge in enumerate(vocab.merges):
            pair = merge.split(" ")
            if len(pair) != 2:
                raise TokenizerError(
                    f"{vocab.origin}: tokenizer.ggml.merges[{number}] {merge!r} is not a pair"
                )
            merges.append((pair[0], pair[1]))
        backend = Backend(
            models.BPE(
                vocab=table,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        split = PRE_TOKENIZER_SPLITS.get(vocab.pre or "")
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        types = vocab.token_types
        control = [
            AddedToken(token, normalized=False, special=True)
            for token, kind in zip(vocab.tokens, types, strict=False)
            if kind == CONTROL and set(token) <= alphabet
        ]
        if control:
            backend.add_special_tokens(control)
        user = [
            AddedToken(token, normalized=False, special=False)
            for token, kind in zip(vocab.tokens, types, strict=False)
            if kind == USER_DEFINED and token in table
        ]
        if user:
            backend.add_tokens(user)

        def text(token_id: int | None) -> str | None:
            if token_id is None or not 0 <= token_id < len(vocab.tokens):
                return None
            return vocab.tokens[token_id]

        bos, eos = text(vocab.bos_token_id), text(vocab.eos_token_id)
        # What llama.cpp adds around a text (tokenizer.ggml.add_bos_token / add_eos_token).
        head: list[str] = []
        tail: list[str] = []
        specials: list[tuple[str, int]] = []
        if vocab.add_bos and bos is not None and vocab.bos_token_id is not None:
            head.append(bos)
            specials.append((bos, vocab.bos_token_id))
        if vocab.add_eos and eos is not None and vocab.eos_token_id is not None:
            tail.append(eos)
            specials.append((eos, vocab.eos_token_id))
        single = [*(f"{t}:0" for t in head), "$A:0", *(f"{t}:0" for t in tail)]
        pair = [*single, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]
        if specials:
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=list(dict.fromkeys(specials))
            )
        special = {
            name: token
            for name, token in (
                ("bos_token", bos),
                ("eos_token", eos),
                ("unk_token", text(vocab.unk_token_id)),
                ("pad_token", text(vocab.pad_token_id)),
            )
            if token is not None
        }
        eos_ids = [i for i in (vocab.eos_token_id, *vocab.extra_eos_token_ids) if i is not None]
        return cls(
            backend=backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            chat_template=vocab.chat_template,
            special_tokens=special,
        )

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template)
        and ``generation_config.json`` (the EOS ids) so :meth:`from_hf_dir` reads it back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        config: dict[str, Any] = dict(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids)}
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation), encoding="utf-8")
