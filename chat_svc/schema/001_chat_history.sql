-- The seed's chat_history table, unchanged.
CREATE TABLE IF NOT EXISTS chat_history
(
    session_id UUID,
    timestamp DateTime64(3, 'UTC'),
    user_id String,
    org_id String,
    message_type Enum8('user' = 1, 'assistant' = 2, 'system' = 3),
    content String,
    metadata JSON
)
ENGINE = MergeTree
ORDER BY (org_id, user_id, timestamp)
