-- The payments ledger: double-entry, append-only, hash-chained per tenant.
-- payments/ledger.py writes it (post_journal) and documents the chart of
-- accounts, the sign convention and the canonical encoding hashed into the
-- chain; payments/ledger_verify.py recomputes the chain.
--
-- What the database itself enforces:
--   * amounts are int64 minor units, never 0; currencies are ISO 4217 codes
--     (three upper-case letters);
--   * every journal balances per currency and has exactly `posting_count`
--     postings, checked at COMMIT by deferred constraint triggers (so no
--     transaction can commit an unbalanced journal or add postings to an
--     already committed one);
--   * UPDATE, DELETE and TRUNCATE on the three ledger tables are refused;
--   * one sequence number and one idempotency key per tenant.
-- What it cannot enforce (a superuser can disable triggers): the hash chain
-- makes any later change to a committed row detectable.

-- The chart of accounts, per tenant. `kind` follows from `code`.
CREATE TABLE ledger_accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    code        text NOT NULL,
    kind        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, code),
    UNIQUE (tenant_id, id),
    CONSTRAINT ledger_accounts_chart CHECK (
        (code = 'customer_receivable' AND kind = 'asset')
        OR (code ~ '^processor_clearing:[a-z0-9][a-z0-9_-]{0,31}$' AND kind = 'asset')
        OR (code = 'merchant_balance' AND kind = 'liability')
        OR (code = 'refunds' AND kind = 'contra_liability')
        OR (code = 'fees' AND kind = 'expense'))
);

-- One journal = one money movement. `seq` numbers a tenant's journals 1, 2, ...
-- without gaps; `hash` = SHA-256(prev_hash || canonical encoding) and
-- `prev_hash` is the previous journal's hash (32 zero bytes for seq 1).
-- `payment_id` has no foreign key yet: the payments table comes later and may
-- add (tenant_id, payment_id) REFERENCES payments (tenant_id, id).
CREATE TABLE ledger_journals (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    seq              bigint NOT NULL CHECK (seq >= 1),
    kind             text NOT NULL CHECK (kind ~ '^[a-z][a-z_]{0,31}$'),
    payment_id       uuid,
    reference        text NOT NULL CHECK (length(reference) <= 200),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    created_at       timestamptz NOT NULL,
    posting_count    integer NOT NULL CHECK (posting_count BETWEEN 2 AND 1000),
    postings_digest  bytea NOT NULL CHECK (octet_length(postings_digest) = 32),
    prev_hash        bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash             bytea NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT ledger_journals_seq_key UNIQUE (tenant_id, seq),
    CONSTRAINT ledger_journals_idempotency_key UNIQUE (tenant_id, idempotency_key),
    UNIQUE (tenant_id, id)
);
CREATE INDEX ledger_journals_payment_idx ON ledger_journals (tenant_id, payment_id)
    WHERE payment_id IS NOT NULL;

-- Signed amounts: a debit is positive, a credit negative; per journal and
-- currency they sum to 0.
CREATE TABLE ledger_postings (
    journal_id    uuid NOT NULL,
    tenant_id     uuid NOT NULL,
    line_no       integer NOT NULL CHECK (line_no >= 1),
    account_id    bigint NOT NULL,
    amount_minor  bigint NOT NULL CHECK (amount_minor <> 0),
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    PRIMARY KEY (journal_id, line_no),
    FOREIGN KEY (tenant_id, journal_id) REFERENCES ledger_journals (tenant_id, id),
    FOREIGN KEY (tenant_id, account_id) REFERENCES ledger_accounts (tenant_id, id)
);
CREATE INDEX ledger_postings_account_idx ON ledger_postings (tenant_id, account_id, currency);

-- Append-only: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_accounts_append_only BEFORE UPDATE OR DELETE ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_accounts_no_truncate BEFORE TRUNCATE ON ledger_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_journals_append_only BEFORE UPDATE OR DELETE ON ledger_journals
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_journals_no_truncate BEFORE TRUNCATE ON ledger_journals
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_postings_append_only BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_postings_no_truncate BEFORE TRUNCATE ON ledger_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Raise check_violation unless journal `p_journal` has exactly its declared
-- number of postings and they sum to 0 in every currency.
CREATE FUNCTION ledger_check_journal(p_journal uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    declared integer;
    actual   integer;
    bad      record;
BEGIN
    SELECT posting_count INTO declared FROM ledger_journals WHERE id = p_journal;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT count(*) INTO actual FROM ledger_postings WHERE journal_id = p_journal;
    IF actual <> declared THEN
        RAISE EXCEPTION 'ledger journal % has % postings but declares %', p_journal, actual, declared
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT currency, sum(amount_minor) AS total INTO bad
        FROM ledger_postings WHERE journal_id = p_journal
        GROUP BY currency HAVING sum(amount_minor) <> 0
        ORDER BY currency LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger journal % is unbalanced: % postings sum to % minor units, not 0',
            p_journal, bad.currency, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
END;
$$;

CREATE FUNCTION ledger_journal_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_check_journal(NEW.id);
    RETURN NULL;
END;
$$;

CREATE FUNCTION ledger_posting_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_check_journal(NEW.journal_id);
    RETURN NULL;
END;
$$;

-- Checked at COMMIT (or at SET CONSTRAINTS ... IMMEDIATE).
CREATE CONSTRAINT TRIGGER ledger_journals_balanced AFTER INSERT ON ledger_journals
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_journal_balanced();
CREATE CONSTRAINT TRIGGER ledger_postings_balanced AFTER INSERT ON ledger_postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_posting_balanced();
