#!/usr/bin/env python3
"""The local S3 server the tests start: moto's server, with its conditional writes atomic.

moto checks a PUT's or DELETE's If-Match / If-None-Match and then writes, with no lock
between the two, so on a loaded machine two conditional PUTs over one ETag can both pass
the check; S3 (and MinIO) let only one of them succeed. s3cached's exact add, cas and incr
across replicas rest on that guarantee (two replicas each acknowledged an incr and one was
lost, 98 of 100, only under heavy load), so the tests run moto with its object writes and
deletes serialized by one lock. Takes moto_server's arguments (-H host -p port).
"""

import functools
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_WRITE_LOCK = threading.Lock()


def _serialized(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with _WRITE_LOCK:
            return method(self, *args, **kwargs)

    return locked


for _name in ("put_object", "delete_object"):
    setattr(S3Response, _name, _serialized(getattr(S3Response, _name)))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
