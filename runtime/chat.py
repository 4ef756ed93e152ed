r"""Tokenizer and chat template for the runtime (tokenizers + jinja2, no
transformers).

The chat template is the model's own (copied into the manifest at export)
and is rendered the way transformers renders it: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks. The rendered prompt holds one
image placeholder, which `prompt_ids` expands as the model's HF processor
does (the manifest's image "expand"):

    repeat    <image> -> tokens_per_image copies of it (LLaVA)
    idefics3  <image> -> per tile of a rows x cols grid
              <fake_token_around_image><row_r_col_c> + image_seq_len <image>,
              "\n" after each row, then "\n" + the global image
              <fake_token_around_image><global-img> + image_seq_len <image>
              <fake_token_around_image>; a (0, 0) grid (image not split) is
              the global image alone. The text is expanded before it is
              tokenized, so merges (e.g. "\n\n") come out as the processor's.
    qwen2_vl  <|image_pad|> -> t*h*w / merge_size**2 copies for a (t, h, w)
              patch grid
    anyres    <image> -> as many copies as the packed features of an image
              of grid (h, w, bh, bw) (LLaVA-NeXT / OneVision: base tile,
              unpadded tile map, a newline per row; runtime/anyres.py)
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

from vlmedge import containment
from vlmedge.errors import ArtifactError, UserInputError
from vlmedge.manifest import ImageFacts, TokenizerFacts

from . import anyres, mrope


def _raise(message: str):
    raise ArtifactError(f"chat template error: {message}")


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
        self.expand = image.expand
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
                                                image_grid=self._probe_grid())
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

    def _probe_grid(self):
        """A small valid image grid for the sample prompt of each expansion."""
        if self.expand == "idefics3":
            return (1, 1)
        if self.expand == "qwen2_vl":
            m = self.image.merge_size
            return (1, m, m)
        if self.expand == "anyres":
            bh, bw = self.image.grid_pinpoints[0]
            return (bh, bw, bh, bw)
        return None

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
        for t in self._image_texts:
            if t in question:
                raise UserInputError(f"the prompt text contains the image placeholder {t!r}",
                                     expected="plain text; the image is placed by the chat "
                                              "template", hint="pass the image separately and "
                                     "remove the placeholder from the text")

    def render(self, question: str, with_image: bool = True) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
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

    def prompt_ids(self, question: str, with_image: bool = True, image_grid=None) -> list[int]:
        """Token ids of the rendered prompt, the image placeholder expanded as
        the HF processor does (module docstring). image_grid: the image's
        tile grid (rows, cols) for idefics3, as the image processor's
        rows/cols (None: (0, 0) where the artifact does not split images);
        its (t, h, w) patch grid for qwen2_vl (image_grid_thw); its
        (h, w, bh, bw) for anyres (original size, tiled resolution)."""
        text = self.render(question, with_image)
        if with_image and self.expand == "idefics3":
            placeholder = self.image.image_placeholder
            head, sep, tail = text.partition(placeholder)
            if sep:
                text = head + idefics3_image_text(self.image, self._tile_grid(image_grid)) + tail
            return self._nonempty(self.encode(text))
        ids = self._nonempty(self.encode(text))
        count = self.tokens_per_image
        if with_image and self.expand == "qwen2_vl":
            if image_grid is None:
                raise UserInputError("this model's image token count depends on the image's "
                                     "patch grid, and none was given",
                                     expected="image_grid=(t, h, w) as the processor's "
                                              "image_grid_thw")
            count = mrope.image_token_count(image_grid, self.image.merge_size)
        if with_image and self.expand == "anyres":
            if image_grid is None:
                raise UserInputError("this model's image token count depends on the image's "
                                     "size, and none was given",
                                     expected="image_grid=(h, w, bh, bw) as preprocess() "
                                              "returns it")
            count = anyres.image_token_count(image_grid, self.image)
        out: list[int] = []
        for t in ids:
            out.extend([t] * count if t == self.image_token_id else [t])
        return out

    @staticmethod
    def _nonempty(ids: list[int]) -> list[int]:
        if not ids:
            raise ArtifactError("the manifest's chat template renders an empty prompt",
                                hint="re-export the artifact")
        return ids

    def _tile_grid(self, image_grid) -> tuple[int, int]:
        if image_grid is None:
            if self.image.do_image_splitting:
                raise UserInputError("this model's prompt depends on the image's tile grid, and "
                                     "none was given", expected="image_grid=(rows, cols)",
                                     hint="(0, 0) for an image that was not split")
            return 0, 0
        try:
            rows, cols = (int(v) for v in image_grid)
        except (TypeError, ValueError):
            raise UserInputError("bad image tile grid", expected="(rows, cols)",
                                 got=repr(image_grid)) from None
        if rows < 0 or cols < 0 or (rows == 0) != (cols == 0):
            raise UserInputError("bad image tile grid",
                                 expected="(rows, cols) both >= 1, or (0, 0) for no split",
                                 got=repr(tuple(image_grid)))
        return rows, cols

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def idefics3_image_text(image: ImageFacts, grid: tuple[int, int]) -> str:
    """The text Idefics3Processor.replace_image_token puts for one image of a
    (rows, cols) tile grid; `image` is the manifest's image section."""
    fake, glob = image.fake_image_token, image.global_image_token
    tokens = image.image_token * image.image_seq_len
    global_image = fake + glob + tokens + fake
    rows, cols = grid
    if rows == 0 and cols == 0:
        return global_image
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += fake + image.tile_token.format(row=r + 1, col=c + 1) + tokens
        text += "\n"
    return text + "\n" + global_image


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
