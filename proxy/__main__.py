"""python -m proxy -> cli.main()."""

from proxy.cli import main

raise SystemExit(main())
