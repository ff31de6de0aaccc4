"""What every Ray Data stage shares: read → validate and id (``readers``, the one row
validator and id rule) → claim (``ledger``) → engine actor pool → write (``sink``,
``storage``: a folder or an object-store prefix), rejects, resume, exactly-once
(``stage.run_stage``); ``records`` is the one column contract."""
