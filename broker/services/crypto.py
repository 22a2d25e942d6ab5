"""Re-encrypting stored secrets under a new encryption key."""

from __future__ import annotations

from django.db import connection, models, transaction

from audit.services import audit_record
from broker.infra.fields import secret_box, secret_box_for
from broker.models import BackendKey, SigningKey

# Every encrypted column; a new EncryptedTextField must be listed here to survive a re-key.
ENCRYPTED_COLUMNS = [(BackendKey, "secret"), (SigningKey, "private_pem")]


def encryption_key_rotate(*, new_key: str) -> int:
    """Re-encrypt every stored secret from the key in force to ``new_key``; all or nothing.

    Works on the raw column so that plaintext never passes through a model instance.
    Returns how many secrets were re-encrypted.
    """
    if len(new_key) < 32:
        raise ValueError("the new encryption key must be at least 32 characters")
    old_box, new_box = secret_box(), secret_box_for(new_key)
    quote = connection.ops.quote_name
    count = 0
    with transaction.atomic(), connection.cursor() as cursor:
        for model, field in ENCRYPTED_COLUMNS:
            table = quote(model._meta.db_table)
            encrypted = model._meta.get_field(field)
            assert isinstance(encrypted, models.Field)
            column = quote(encrypted.column)
            cursor.execute(f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL")  # noqa: S608
            rows = cursor.fetchall()
            for pk, raw in rows:
                ciphertext = new_box.encrypt(old_box.decrypt(bytes(raw)))
                cursor.execute(
                    f"UPDATE {table} SET {column} = %s WHERE id = %s",  # noqa: S608
                    [ciphertext, pk],
                )
            count += len(rows)
        audit_record(action="encryption_key.rotated", secrets=count)
    return count
