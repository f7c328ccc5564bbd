//! LDAP directory source and sink.
