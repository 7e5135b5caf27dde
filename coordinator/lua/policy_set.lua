-- policy_set.lua: store a new version of one policy document and record it in its history.
-- The policy set's version (one counter for all documents) grows by one per change, and the
-- routing version too, so routers reload the policies they enforce.
--
-- KEYS[1] documents hash (name -> record json)   KEYS[2] policy set version (counter)
-- KEYS[3] this document's history list           KEYS[4] routing version
-- ARGV[1] name   ARGV[2] document json   ARGV[3] who set it   ARGV[4] action (set | rollback to N)
-- Returns the new policy set version
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = redis.call('INCR', KEYS[2])
local record = '{"version":' .. version .. ',"set_by":' .. cjson.encode(ARGV[3]) .. ',"set_at":' ..
  now .. ',"action":' .. cjson.encode(ARGV[4]) .. ',"document":' .. ARGV[2] .. '}'
redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('RPUSH', KEYS[3], record)
redis.call('INCR', KEYS[4])
return version
