"""Turn generated token ids into :class:`Token` events with correct text deltas.

Two things make this more than ``decode([token_id])``:

* byte-level tokenizers split one character over several tokens, so a token's own decode can be
  half a character (shown as U+FFFD); its text is settled only once the character is complete;
* stop strings must never reach the user, so text that could be the start of a stop string is
  held back until the next tokens show whether it is one.

Held tokens are released in order, so event order always matches generation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from inferledger.inference.base import Token

REPLACEMENT_CHAR = "\ufffd"


class TokenStream:
    """Feed token ids in with :meth:`push`; get the tokens that are ready to show back."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._texts: list[str] = []  # settled text per token, for tokens not yet released
        self._settled = 0  # tokens [0, settled) have their text decided
        self._released = 0  # tokens [0, released) have been handed out
        self.stopped = False
        """True once a stop string was found; push nothing more after that."""

    def push(self, token_id: int) -> list[Token]:
        """Add one generated token; return the tokens (possibly none) now safe to show."""
        if self.stopped:
            raise RuntimeError("stream already hit a stop string")
        self._ids.append(token_id)
        tail = self._decode(self._ids[self._settled :])
        if tail.endswith(REPLACEMENT_CHAR):
            return []  # an unfinished character: wait for the tokens that complete it
        self._settle(tail)
        return self._release()

    def finish(self) -> list[Token]:
        """Generation ended without a stop string: hand out everything still held."""
        if self.stopped:
            return []
        if self._settled < len(self._ids):
            self._settle(self._decode(self._ids[self._settled :]))
        return self._take(len(self._ids), cut=None)

    def _settle(self, tail: str) -> None:
        # The whole tail belongs to the token that completed it; earlier ones carry no text.
        pending = len(self._ids) - self._settled
        self._texts.extend([""] * (pending - 1) + [tail])
        self._settled = len(self._ids)

    def _release(self) -> list[Token]:
        text = "".join(self._texts)
        hit = self._find_stop(text)
        if hit is not None:
            self.stopped = True
            return self._take(self._settled, cut=hit)
        safe = len(text) - self._held_suffix(text)
        end = 0
        count = 0
        for piece in self._texts:
            if end + len(piece) > safe:
                break
            end += len(piece)
            count += 1
        return self._take(self._released + count, cut=None)

    def _take(self, upto: int, cut: int | None) -> list[Token]:
        """Release tokens up to index ``upto``; with ``cut``, drop held text from there on."""
        tokens = []
        visible = cut
        for token_id, piece in zip(self._ids[self._released : upto], self._texts, strict=False):
            if visible is not None:
                piece = piece[:visible]
                visible -= len(piece)
            tokens.append(Token(token_id=token_id, text=piece))
        del self._texts[: upto - self._released]
        self._released = upto
        return tokens

    def _find_stop(self, text: str) -> int | None:
        positions = [text.find(stop) for stop in self._stop]
        found = [p for p in positions if p >= 0]
        return min(found) if found else None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
