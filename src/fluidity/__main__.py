from fluidity.cli import main

raise SystemExit(main())
