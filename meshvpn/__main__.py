from meshvpn.cli import main

raise SystemExit(main())
