//! Adapters for environments other than the embedded default. `postgres`: a direct PostgreSQL
//! connection (the test adapter, and a product feature for long-lived containers). The AWS
//! adapters (Data API, SES v2, Lambda Invoke) join here.

pub mod aws;
pub mod postgres;
