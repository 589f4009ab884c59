"""The CRM database: schema (``schema``), CRM statements (``crm``) and batchsync's ledger (``ledger``)."""
