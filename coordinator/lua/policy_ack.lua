-- policy_ack.lua: record what a peer did with a policy set version, keeping the newest answer,
-- and acknowledge the request entry that carried it.
--
-- KEYS[1] acks hash (peer_id -> json)   KEYS[2] request stream
-- ARGV[1] peer id   ARGV[2] version   ARGV[3] distribution nonce   ARGV[4] '1' applied | '0' refused
-- ARGV[5] error text   ARGV[6] consumer group   ARGV[7] request entry id, or '' (nothing to ack)
-- Returns 1 if recorded, 0 if a newer version was already recorded for the peer
if ARGV[7] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[6], ARGV[7])
end
local known = redis.call('HGET', KEYS[1], ARGV[1])
if known then
  local ok, old = pcall(cjson.decode, known)
  if ok and type(old) == 'table' and tonumber(old.version or 0) > tonumber(ARGV[2]) then
    return 0
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({version = tonumber(ARGV[2]), nonce = ARGV[3],
  ok = ARGV[4] == '1', error = ARGV[5], at = now}))
return 1
