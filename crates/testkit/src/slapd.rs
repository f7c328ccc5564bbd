//! A throwaway OpenLDAP `slapd` on loopback, for tests.
