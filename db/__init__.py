"""Database: models, engine and session, migrations, seeds, secrets at rest."""
