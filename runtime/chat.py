r"""Tokenizer and chat template for the runtime (tokenizers + jinja2, no
transformers).

The chat template is the model's own (copied into the manifest at export)
and is rendered the way transformers renders it: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks. The rendered prompt holds one
image placeholder per image (several images: at the prompt's <image>
markers, else all first; `user_content`), each of which `prompt_ids` expands
by its own image's grid as the model's HF processor does: the family's
runtime adapter (runtime/adapters/, picked by the manifest's image.expand)
says what one image's placeholder becomes, in the text before tokenizing
(so merges such as "\n\n" come out as the processor's) or as copies of the
image token after it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

from vlmedge import containment
from vlmedge.errors import ArtifactError, UserInputError
from vlmedge.manifest import ImageFacts, TokenizerFacts

from .adapters import adapter_for


def _raise(message: str):
    raise ArtifactError(f"chat template error: {message}")


# The literal text a user's prompt puts where an image goes ("compare <image>
# with <image>"); without markers the images come first, as the HF chat
# templates' default (a user message of N image entries, then the text).
IMAGE_MARKER = "<image>"

def user_content(question: str, n_images: int) -> list[dict]:
    """The user message's content parts for the chat template: n_images
    image entries at the question's <image> markers (one marker per image,
    text between them kept as it is, empty pieces dropped), or, with no
    marker, all images first and then the question."""
    pieces = question.split(IMAGE_MARKER)
    markers = len(pieces) - 1
    if markers == 0:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    if markers != n_images:
        raise UserInputError(f"the prompt's {IMAGE_MARKER} markers and its images disagree",
                             expected=f"one {IMAGE_MARKER} marker per image ({n_images}), or "
                                      f"none (images first)", got=f"{markers} markers",
                             hint=f"put {IMAGE_MARKER} where each image goes, or drop them all")
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


# What a chat template can raise while rendering: jinja2's own errors (the
# sandbox's SecurityError among them) and Python's, from a template that
# calls a method the wrong way or asks for too much memory.
_RENDER_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError,
                  OverflowError, MemoryError, ZeroDivisionError)

# A chat template is the artifact's code: bounded in size, in what one
# render may build ('x' * 10**13) or loop over (nested range()), and in time
# at load. Real templates are a few kilobytes and loop over the messages.
MAX_TEMPLATE_CHARS = 64 * 1024
MAX_RENDER_ITEMS = 100_000
PROBE_TIMEOUT_S = 5.0


def _bounded_environment(budget: threading.local):
    """jinja2's immutable sandbox, with '*' and '**' capped and range()
    drawing on a per-render budget (budget.left, reset by render())."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64:
                    raise SecurityError("exponent too large for a chat template")
                return left ** right
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * n > MAX_RENDER_ITEMS:
                    raise SecurityError("repetition too large for a chat template")
            return left * right

    def bounded_range(*args):
        r = range(*args)
        left = getattr(budget, "left", MAX_RENDER_ITEMS) - len(r)
        if left < 0:
            raise SecurityError(f"the template's loops exceed {MAX_RENDER_ITEMS} items")
        budget.left = left
        return r

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.pop("lipsum", None)  # lipsum(10**5) builds megabytes of text: no template needs it
    env.globals["range"] = bounded_range
    env.globals["raise_exception"] = _raise
    return env


class ChatTokenizer:
    """The artifact's tokenizer and chat template.

    directory: the artifact; facts: the manifest's TokenizerFacts; image: its
    ImageFacts; files: its `files` (the tokenizer file must be listed there).
    The tokenizer file is read here, in Python, after the containment check,
    and parsed from the string; the template is compiled and rendered once
    now, so a broken one fails at load."""

    def __init__(self, directory: Path, facts: TokenizerFacts, image: ImageFacts,
                 files: Mapping):
        from jinja2 import TemplateError
        from tokenizers import Tokenizer

        self._template_errors = (TemplateError,) + _RENDER_ERRORS
        path = containment.listed_file(directory, facts.file, "tokenizer.file", files)
        data = containment.read_bytes(path, facts.file)  # unreadable: one ArtifactError
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ArtifactError(f"tokenizer {facts.file} is not UTF-8 text",
                                hint="re-export the artifact") from None
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise ArtifactError(f"cannot read tokenizer {facts.file}: {str(e)[:160]}",
                                hint="re-export the artifact") from None
        if len(facts.chat_template) > MAX_TEMPLATE_CHARS:
            raise ArtifactError("the manifest's chat template is too long",
                                expected=f"<= {MAX_TEMPLATE_CHARS} characters",
                                got=str(len(facts.chat_template)), hint="re-export the artifact")
        self._budget = threading.local()
        env = _bounded_environment(self._budget)
        try:
            self.template = env.from_string(facts.chat_template)
        except self._template_errors as e:
            raise ArtifactError(f"the manifest's chat template does not compile: "
                                f"{type(e).__name__}: {str(e)[:120]}",
                                hint="re-export the artifact") from None
        self.special = facts.special_tokens()
        self.add_special_tokens = facts.add_special_tokens
        self.stop_token_ids = list(facts.stop_token_ids)
        self.image = image
        self.image_token_id = image.image_token_id
        self.tokens_per_image = image.tokens_per_image
        self.adapter = adapter_for(image)  # the family's image layout (runtime/adapters/)
        # Text a user's prompt may not contain: it would become image slots.
        self._image_texts = sorted({t for t in (image.image_token, image.image_placeholder,
                                                image.fake_image_token, image.global_image_token)
                                    if t})
        self._probe()

    def _probe(self) -> None:
        """Renders and tokenizes a sample prompt once, in a thread with a time
        limit: a template that fails, hangs, drops the image or renders
        nothing fails here, at load, not on the first request."""
        result: dict = {}

        def run():
            try:
                result["ids"] = self.prompt_ids("describe the image.", with_image=True,
                                                image_grid=self.adapter.probe_grid())
            except (ArtifactError, UserInputError) as e:
                result["error"] = e

        t = threading.Thread(target=run, name="vlmedge-template-probe", daemon=True)
        t.start()
        t.join(PROBE_TIMEOUT_S)
        if t.is_alive():
            raise ArtifactError("the manifest's chat template does not finish rendering",
                                expected=f"a render in under {PROBE_TIMEOUT_S:.0f} s",
                                hint="re-export the artifact")
        if "error" in result:
            raise result["error"]
        if self.image_token_id not in result["ids"]:
            raise ArtifactError("the manifest's chat template does not place the image",
                                expected=f"the image placeholder {self.image.image_placeholder!r} "
                                         f"in the rendered prompt", hint="re-export the artifact")

    def check_text(self, question: str) -> None:
        """A prompt's text: valid Unicode (no lone surrogates, e.g. from
        undecodable command-line bytes) and free of the image placeholder,
        which would be read as image slots."""
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserInputError("the prompt is not valid Unicode text",
                                 expected="UTF-8 encodable text",
                                 got=f"{e.reason} at character {e.start}",
                                 hint="decode the input as UTF-8 first") from None
        text = question.replace(IMAGE_MARKER, "")  # the user's own markers: where images go
        for t in self._image_texts:
            if t in text:
                raise UserInputError(f"the prompt text contains the image placeholder {t!r}",
                                     expected=f"plain text; images go at {IMAGE_MARKER} markers, "
                                              "else the chat template places them",
                                     hint="pass the images separately and remove the "
                                          "placeholder from the text")

    def render(self, question: str, with_image: bool = True, n_images: int | None = None) -> str:
        """The chat template rendered for one user message: `n_images` image
        entries (None: one if with_image, else none) placed at the question's
        <image> markers, else all before the text (user_content)."""
        n = (1 if with_image else 0) if n_images is None else n_images
        content = user_content(question, n)
        self._budget.left = MAX_RENDER_ITEMS
        try:
            return self.template.render(messages=[{"role": "user", "content": content}],
                                        add_generation_prompt=True, **self.special)
        except ArtifactError:
            raise
        except self._template_errors as e:
            raise ArtifactError(f"the manifest's chat template fails to render: "
                                f"{type(e).__name__}: {str(e)[:120]}",
                                hint="re-export the artifact") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids

    def prompt_ids(self, question: str, with_image: bool = True, image_grid=None,
                   image_grids=None) -> list[int]:
        """Token ids of the rendered prompt, each image placeholder expanded as
        the HF processor does (module docstring). image_grid: the image's
        tile grid (rows, cols) for idefics3, as the image processor's
        rows/cols (None: (0, 0) where the artifact does not split images);
        its (t, h, w) patch grid for qwen2_vl (image_grid_thw); its
        (h, w, bh, bw) for anyres (original size, tiled resolution).
        image_grids: several images' grids, in prompt order (with_image and
        image_grid unused): the question's <image> markers place them, else
        they all come first (user_content)."""
        grids = list(image_grids) if image_grids is not None else \
            ([image_grid] if with_image else [])
        self.check_image_count(len(grids))
        self.adapter.check_grids(grids)
        text = self.render(question, n_images=len(grids))
        if grids:
            texts = [self.adapter.image_text(g) for g in grids]
            if texts[0] is not None:  # expanded in the text, as the processor does
                pieces = text.split(self.image.image_placeholder)
                self._check_placed(len(pieces) - 1, len(grids))
                text = pieces[0] + "".join(t + piece for t, piece in zip(texts, pieces[1:]))
                return self._nonempty(self.encode(text))
        ids = self._nonempty(self.encode(text))
        if not grids:
            return ids
        self._check_placed(ids.count(self.image_token_id), len(grids))
        counts = iter([self.adapter.image_token_count(g) for g in grids])
        out: list[int] = []
        for t in ids:
            out.extend([t] * next(counts) if t == self.image_token_id else [t])
        return out

    def check_image_count(self, n: int) -> None:
        """Several images in one prompt where this artifact's layout packs them
        as the HF processor + model do; else one line, before any image is
        preprocessed."""
        self.adapter.check_image_count(n)

    def check_images(self, question: str, n: int) -> None:
        """A request's n images against this model and the question's <image>
        markers, refused in one line when the request is made (stream()
        checks before its first piece is read)."""
        self.check_image_count(n)
        user_content(question, n)

    def _check_placed(self, placed: int, n: int) -> None:
        if placed != n:
            raise ArtifactError("the manifest's chat template does not place the images",
                                expected=f"{n} image placeholder(s) "
                                         f"{self.image.image_placeholder!r} in the rendered prompt",
                                got=str(placed), hint="re-export the artifact")

    @staticmethod
    def _nonempty(ids: list[int]) -> list[int]:
        if not ids:
            raise ArtifactError("the manifest's chat template renders an empty prompt",
                                hint="re-export the artifact")
        return ids

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        """The answer text, special tokens skipped; keep_special keeps them (the
        grounding markers of Qwen2-VL and InternVL are special tokens, and
        the box parsers read labels from between them)."""
        return self.tokenizer.decode(ids, skip_special_tokens=not keep_special)


class StreamDecoder:
    """Turns tokens into text pieces that are always complete UTF-8.

    Decodes everything generated so far and emits the new suffix; while the
    text ends in U+FFFD (a character whose bytes are split across tokens) it
    holds the piece back until the next token completes it."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
