from hsam.apps.cli import main

raise SystemExit(main())
