"""Memory child of the end-to-end benchmark: ``python -m bench.harness.memchild`` reads a JSON
spec on stdin and prints one JSON line, the working memory (MiB) of each case of each setting.
Started by :func:`bench.harness.e2e.memory_in_child` with ``MALLOC_MMAP_THRESHOLD_`` set."""
import json
import sys


def main() -> int:
    from .e2e import child_main

    rows = child_main(json.loads(sys.stdin.read()))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
