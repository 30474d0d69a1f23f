--[[
hostmeter flush-usage: read one tenant-hour at once (protocol version 1).

  EVALSHA <sha1> 3 hm:{T}:posts:H hm:{T}:host:H hm:{T}:service:H

Returns {posts, {host, value, ...}, {service, value, ...}}: the posts counter (0 when absent)
and both hashes, read in one atomic step, so that the counter names exactly the posts whose
bits the hashes hold (release_hour.lua deletes the hour only if the counter has not moved).
]]
local posts = redis.call('GET', KEYS[1]) or '0'
return {posts, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
