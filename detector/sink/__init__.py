"""``detector sink``: the decision log (decisions and dialer outcomes in SQLite or PostgreSQL)."""
