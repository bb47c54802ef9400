-- Reconciliation runs: a processor's settlement report matched against the
-- ledger (payments/reconciliation.py, `switchboard reconcile`). One run per
-- imported report; one item per (journal kind, processor reference) with its
-- outcome. Amounts are minor units of ISO 4217 currencies.

CREATE TABLE reconciliation_runs (
    id                 uuid PRIMARY KEY,
    tenant_id          uuid NOT NULL REFERENCES tenants (id),
    -- the ledger's processor name: journals on processor_clearing:<processor>
    processor          text NOT NULL CHECK (processor ~ '^[a-z0-9][a-z0-9_-]{0,31}$'),
    report_format      text NOT NULL CHECK (report_format IN ('stripe', 'adyen')),
    report_name        text NOT NULL CHECK (length(report_name) <= 1000),
    report_sha256      bytea NOT NULL CHECK (octet_length(report_sha256) = 32),
    report_rows        integer NOT NULL CHECK (report_rows >= 0),
    -- [period_start, period_end): the report's period (NULL for an empty report)
    period_start       timestamptz,
    period_end         timestamptz,
    matched            integer NOT NULL CHECK (matched >= 0),
    conflicted         integer NOT NULL CHECK (conflicted >= 0),
    missing_in_ledger  integer NOT NULL CHECK (missing_in_ledger >= 0),
    missing_in_report  integer NOT NULL CHECK (missing_in_report >= 0),
    -- {"<report row type>": count} of the rows that were not reconciled (payouts, disputes...)
    skipped            jsonb NOT NULL,
    -- [{"currency", "report_minor", "ledger_minor" (null: the ledger books no fees)}]
    fees               jsonb NOT NULL,
    -- true when everything matched and the fees agree
    ok                 boolean NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id)
);
CREATE INDEX reconciliation_runs_tenant_idx ON reconciliation_runs (tenant_id, processor, created_at DESC);

CREATE TABLE reconciliation_items (
    run_id          uuid NOT NULL,
    tenant_id       uuid NOT NULL,
    item_no         integer NOT NULL CHECK (item_no >= 1),
    outcome         text NOT NULL
        CHECK (outcome IN ('matched', 'conflicted', 'missing_in_ledger', 'missing_in_report')),
    kind            text NOT NULL CHECK (kind IN ('capture', 'refund')),
    reference       text NOT NULL,
    -- {"EUR": 1050}: each side's summed amounts ({} when that side has nothing)
    report_amounts  jsonb NOT NULL,
    ledger_amounts  jsonb NOT NULL,
    report_lines    integer[] NOT NULL,
    journal_ids     uuid[] NOT NULL,
    detail          text NOT NULL,
    PRIMARY KEY (run_id, item_no),
    FOREIGN KEY (tenant_id, run_id) REFERENCES reconciliation_runs (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX reconciliation_items_discrepancy_idx ON reconciliation_items (tenant_id, run_id, outcome)
    WHERE outcome <> 'matched';

-- Reconciliation looks journals up by processor reference.
CREATE INDEX ledger_journals_reference_idx ON ledger_journals (tenant_id, reference);
