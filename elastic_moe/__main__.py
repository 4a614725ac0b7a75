"""`python -m elastic_moe`: the `elastic-moe` command line."""

from elastic_moe.cli import main

raise SystemExit(main())
