"""`python -m elastic_moe`: the `elastic-moe` command line."""

from serve.cli import main

raise SystemExit(main())
