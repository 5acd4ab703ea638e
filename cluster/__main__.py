from cluster.ops.cli import main

raise SystemExit(main())
