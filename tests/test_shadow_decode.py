"""Shadow compare reads compressed answers: a model server may gzip its answer (MLServer
does above 500 bytes for a client that accepts it), and two gzip bodies that are not
JSON used to read as "absent" on both sides, so every path agreed."""

from __future__ import annotations

import gzip
import zlib

from proxy.answer import decoded
from proxy.config.model import CompareConfig
from proxy.shadow.compare import compare

CFG = CompareConfig(json_paths=("outputs.0.data.0",))


def _body(value: int) -> bytes:
    return b'{"outputs": [{"data": [%d, 2, 3]}]}' % value


def test_gzip_and_zlib_answers_are_compared_as_json():
    for pack in (gzip.compress, zlib.compress):
        verdict = compare(CFG, primary_status=200, shadow_status=200,
                          primary_body=pack(_body(1)), shadow_body=pack(_body(7)))
        assert verdict.paths_compared and verdict.kinds == ["body"]
        assert verdict.paths[0].primary == 1 and verdict.paths[0].shadow == 7
    mixed = compare(CFG, primary_status=200, shadow_status=200,
                    primary_body=gzip.compress(_body(1)), shadow_body=_body(1))
    assert mixed.paths_compared and not mixed.paths


def test_a_compressed_body_that_cannot_be_read_is_not_compared_not_agreed():
    cut = gzip.compress(_body(1))[:-6]  # kept capped, or damaged
    verdict = compare(CFG, primary_status=200, shadow_status=200,
                      primary_body=cut, shadow_body=gzip.compress(_body(1)))
    assert not verdict.paths_compared
    assert decoded(b'{"plain": true}') == b'{"plain": true}'
    assert decoded(b"data: {}\n\n") == b"data: {}\n\n"
