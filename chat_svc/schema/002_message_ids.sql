-- Stable message ids (history pages and StreamChat events name messages) and partial answers.
ALTER TABLE chat_history ADD COLUMN IF NOT EXISTS message_id UUID;
ALTER TABLE chat_history ADD COLUMN IF NOT EXISTS incomplete Bool DEFAULT false
