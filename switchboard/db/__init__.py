"""PostgreSQL access: the connection pool and the schema migrations."""
