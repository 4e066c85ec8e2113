"""moto's S3 server with conditional writes as atomic as S3's: ``python tests/moto_s3.py
-H 127.0.0.1 -p 0`` takes moto.server's arguments.

moto checks ``If-None-Match``/``If-Match`` and then stores the object without a lock
(shared/TOOLING.md), so two processes racing for the lease can, rarely and only under load,
both win: one later fails its commit (exit 1), which S3 itself never causes. Real S3
decides each conditional write atomically; here every object write and delete runs under
one lock, which moto's speed on these cores (about 375 PUT/s, bound by the GIL) hardly
notices. Stores that lack or ignore the conditions are ``tests/s3proxy.py``'s quirks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from moto import server
from moto.s3.responses import S3Response

_WRITES = threading.RLock()


def _atomic(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _WRITES:
            return method(*args, **kwargs)

    return locked


for _name in ("put_object", "delete_object", "copy_object"):
    setattr(S3Response, _name, _atomic(getattr(S3Response, _name)))

if __name__ == "__main__":
    server.main()
