"""Write one file from any pyarrow file system to stdout (webdataset's ``pipe:`` reader for s3/gs)."""

from __future__ import annotations

import shutil
import sys

from pipeline.io.storage import filesystem_for


def main(uri: str) -> None:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as src:
        shutil.copyfileobj(src, sys.stdout.buffer, length=1 << 20)


if __name__ == "__main__":
    main(sys.argv[1])
