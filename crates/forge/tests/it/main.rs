//! forge integration tests
