from hsam.cli import main

raise SystemExit(main())
