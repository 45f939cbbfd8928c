#!/usr/bin/env python3
"""The local S3 server the tests start: moto's server, with its conditional writes atomic.

moto checks a PUT's or DELETE's If-Match / If-None-Match and then writes, with no lock
between the two, so on a loaded machine two conditional PUTs over one ETag can both pass
the check; S3 (and MinIO) let only one of them succeed. s3cached's exact add, cas and incr
across replicas rest on that guarantee (two replicas each acknowledged an incr and one was
lost, 98 of 100, only under heavy load), so the tests run moto with its object writes and
deletes serialized by one lock.

    s3server.py [-H HOST] [-p PORT] [--port-file FILE]

Port 0 (the default) lets the kernel choose; the port bound is written to FILE (written
beside and renamed, so it is whole when it appears), which is how the tests learn it
without probing a port somebody else may hold.
"""

import argparse
import functools
import os
import signal
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

_WRITE_LOCK = threading.Lock()


def _serialized(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with _WRITE_LOCK:
            return method(self, *args, **kwargs)

    return locked


for _name in ("put_object", "delete_object"):
    setattr(S3Response, _name, _serialized(getattr(S3Response, _name)))


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=0)
    parser.add_argument("--port-file")
    args = parser.parse_args(argv)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(args.host, args.port, app, threaded=True)
    os.environ["MOTO_PORT"] = str(server.port)
    if args.port_file:
        partial = args.port_file + ".partial"
        with open(partial, "w") as f:
            f.write(f"{server.port}\n")
        os.replace(partial, args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
