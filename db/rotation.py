"""Re-encrypt every stored secret under the newest key, so the old key can then be removed."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from db.encryption import EncryptedText, Keyring


def encrypted_columns() -> list[tuple[str, str, tuple[str, ...]]]:
    """(table, primary key, encrypted columns), derived from the models: a new secret column is covered."""
    import db.models  # noqa: F401  (registers the tables)

    out = []
    for table in SQLModel.metadata.sorted_tables:
        columns = tuple(c.name for c in table.columns if isinstance(c.type, EncryptedText))
        if columns:
            out.append((table.name, table.primary_key.columns.keys()[0], columns))
    return out


def rotate_all(conn: Connection, keyring: Keyring, batch: int = 500) -> int:
    """Rewrite each ciphertext with the first key; returns how many values were rewritten."""
    rewritten = 0
    for table, pk, columns in encrypted_columns():
        for column in columns:
            last = None
            while True:
                rows = conn.execute(
                    text(f"SELECT {pk}, {column} FROM {table} WHERE {column} IS NOT NULL"  # noqa: S608 (fixed names)
                         f"{' AND ' + pk + ' > :last' if last is not None else ''} ORDER BY {pk} LIMIT :n"),
                    {"last": last, "n": batch},
                ).all()
                if not rows:
                    break
                for row_id, ciphertext in rows:
                    conn.execute(text(f"UPDATE {table} SET {column} = :v WHERE {pk} = :id"),  # noqa: S608
                                 {"v": keyring.rotate(ciphertext), "id": row_id})
                    rewritten += 1
                last = rows[-1][0]
    return rewritten
