"""Signed, versioned wire messages: schemas, envelopes, errors, key rotation."""
