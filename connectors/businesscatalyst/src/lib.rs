//! Business Catalyst CRM (SOAP) source and sink, and its sandbox.
