//! Poppulo (Newsweaver API v2) source and sink, and a Poppulo sandbox.
