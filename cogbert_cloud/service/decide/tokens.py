"""State tokens: a session's recurrent state, sealed so that any replica can take the next step.

A token is what the service returns with every decision and accepts with the next one::

    u8  version (1)          u8  key id        u8  session length   u8  model length
    u16 hidden               u16 reserved      i64 next step        u32 issued (unix seconds)
    session (UTF-8)          model id (UTF-8)  h: hidden float32    c: hidden float32
    16 bytes HMAC-SHA256(key, client name || 0x00 || everything above), truncated

The state travels in the clear (it is the client's own session; it reveals what a model
remembers of that client's observations, nothing else) but cannot be altered or moved: the
MAC covers the session, the model version, the step, the state and the client it was issued
to. Keys rotate: the service signs with the first key of its key ring and accepts every key in
it, so a new key is added everywhere first, then made first, and the old one removed after the
longest session (``max_age``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import struct
import time
from dataclasses import dataclass

import numpy as np

from cogbert_cloud.service.decide.errors import TokenError
from cogbert_edge.errors import ConfigError

__all__ = ["KeyRing", "StateToken", "TOKEN_VERSION"]

TOKEN_VERSION = 1
_HEAD = struct.Struct("<BBBBHHqI")
_MAC = 16


@dataclass(frozen=True)
class StateToken:
    session: str
    model: str
    step: int           # the step index the next decision of this session gets
    h: np.ndarray
    c: np.ndarray
    issued: int


class KeyRing:
    """HMAC keys by id (0-255); the first signs, all verify."""

    def __init__(self, keys: list[tuple[int, bytes]], *, max_age: float = 7 * 24 * 3600.0) -> None:
        if not keys:
            raise ConfigError("the state-token key ring is empty: give at least one key (id:hex)")
        for kid, secret in keys:
            if not 0 <= kid <= 255 or len(secret) < 16:
                raise ConfigError(f"state-token key {kid}: ids are 0-255 and keys at least 16 bytes")
        if len({k for k, _ in keys}) != len(keys):
            raise ConfigError("state-token key ids must be distinct")
        self.keys = dict(keys)
        self.signing = keys[0][0]
        self.max_age = max_age

    @classmethod
    def parse(cls, spec: str, *, max_age: float = 7 * 24 * 3600.0) -> KeyRing:
        """``"1:HEX,0:HEX"``: id and hex secret of each key, the signing key first."""
        keys = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kid, _, secret = part.partition(":")
            try:
                keys.append((int(kid), bytes.fromhex(secret)))
            except ValueError:
                raise ConfigError(f"state-token key {part[:8]}...: expected ID:HEX") from None
        return cls(keys, max_age=max_age)

    def seal(self, client: str, session: str, model: str, step: int, h: np.ndarray, c: np.ndarray) -> bytes:
        s, m = session.encode(), model.encode()
        body = b"".join((_HEAD.pack(TOKEN_VERSION, self.signing, len(s), len(m), h.shape[-1], 0, step,
                                    int(time.time())), s, m, np.ascontiguousarray(h, np.float32).tobytes(),
                         np.ascontiguousarray(c, np.float32).tobytes()))
        return body + self._mac(self.keys[self.signing], client, body)

    def open(self, raw: bytes | str, client: str, session: str) -> StateToken:
        """The verified token, or TokenError saying why not."""
        if isinstance(raw, str):
            try:
                raw = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            except (binascii.Error, ValueError):
                raise TokenError("state token is not base64url") from None
        if len(raw) < _HEAD.size + _MAC:
            raise TokenError("state token is truncated")
        version, kid, sl, ml, hidden, _, step, issued = _HEAD.unpack_from(raw)
        if version != TOKEN_VERSION:
            raise TokenError(f"state token version {version} is not {TOKEN_VERSION}")
        key = self.keys.get(kid)
        if key is None:
            raise TokenError(f"state token is signed with key {kid}, which this service does not hold "
                             "(rotated out, or from another deployment)")
        size = _HEAD.size + sl + ml + 8 * hidden
        if len(raw) != size + _MAC:
            raise TokenError("state token has the wrong length")
        body = raw[:size]
        if not hmac.compare_digest(self._mac(key, client, body), raw[size:]):
            raise TokenError("state token does not verify: altered, or issued to another client")
        off = _HEAD.size
        tok_session = body[off:off + sl].decode("utf-8", "replace")
        if tok_session != session:
            raise TokenError(f"state token belongs to another session, not {session!r}")
        model = body[off + sl:off + sl + ml].decode("utf-8", "replace")
        if time.time() - issued > self.max_age:
            raise TokenError("state token has expired; start a new session")
        off += sl + ml
        h = np.frombuffer(body, np.float32, hidden, off)
        c = np.frombuffer(body, np.float32, hidden, off + 4 * hidden)
        return StateToken(tok_session, model, step, h, c, issued)

    @staticmethod
    def _mac(key: bytes, client: str, body: bytes) -> bytes:
        return hmac.digest(key, client.encode() + b"\0" + body, "sha256")[:_MAC]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
