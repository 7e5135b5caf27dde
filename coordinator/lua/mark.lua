-- mark.lua: store a sender's nonce mark before its control request takes effect, fenced by the
-- router lease; a mark only ever rises (a slow or deposed router never lowers it).
--
-- KEYS[1] router lease of the partition (string: owner token)
-- KEYS[2] nonce marks (hash: peer id -> "<nonce> <entry id>")
-- ARGV[1] lease token of the calling router
-- ARGV[2] peer id
-- ARGV[3] nonce (integer, microseconds: exact in a Lua number); ARGV[4] request entry id
-- Returns 1 stored | 0 kept (the stored mark is as high already) | -1 the lease is not ours
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local old = redis.call('HGET', KEYS[2], ARGV[2])
if old and (tonumber(string.match(old, '^%d+')) or 0) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
return 1
