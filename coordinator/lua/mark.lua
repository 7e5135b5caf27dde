-- mark.lua: store a sender's nonce mark before its control request takes effect, fenced by the
-- router lease; a mark only ever rises (a slow or deposed router never lowers it).
--
-- KEYS[1] router lease of the partition (string: owner token)
-- KEYS[2] nonce marks (hash: peer id -> "<nonce> <entry id>")
-- ARGV[1] lease token of the calling router
-- ARGV[2] peer id
-- ARGV[3] nonce (integer, microseconds: exact in a Lua number); ARGV[4] request entry id
-- Returns 1 stored (or already this entry's mark: it is being processed again after a crash)
--   | 0 refused: another entry's mark is as high, so this request is a replay
--   | -1 the lease is not ours (nothing written)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local old = redis.call('HGET', KEYS[2], ARGV[2])
if old then
  local nonce, entry = string.match(old, '^(%d+) (.*)$')
  if entry == ARGV[4] then
    return 1
  end
  if (tonumber(nonce) or 0) >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
return 1
