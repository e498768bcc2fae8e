"""Persistence: SQLAlchemy tables and repositories that return core types."""
